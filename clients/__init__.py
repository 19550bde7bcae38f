"""Flower ClientApp: routes each message to the party or the key-holder role of this node."""
