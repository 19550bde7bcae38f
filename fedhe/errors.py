"""One exception hierarchy for fedhe: every error names what was wrong and what to do."""

from __future__ import annotations


class FedHEError(Exception):
    """Root of every error fedhe raises on purpose."""


class ParameterError(FedHEError, ValueError):
    """CKKS parameters are invalid or below the 128-bit security table."""


class SecretKeyLeakError(FedHEError):
    """A context that holds a secret key was about to cross a role boundary."""


class ContextMismatchError(FedHEError):
    """A ciphertext was made under another context (other keys or other parameters)."""


class InvalidCiphertextError(FedHEError):
    """Serialized ciphertext bytes are malformed, truncated or not a ciphertext at all."""


class ShapeError(FedHEError, ValueError):
    """A tensor has another shape or size than the job expects."""


class ValueRangeError(FedHEError, ValueError):
    """Values are NaN, infinite, or too large for the CKKS parameters to hold exactly."""


class DataError(FedHEError, ValueError):
    """A dataset or CSV file is missing, empty or malformed."""


class PolicyError(FedHEError):
    """The key holder refused a decryption request under its decryption policy."""


class ProtocolError(FedHEError):
    """A message between roles is missing a field, has the wrong role, or the job cannot go on."""


class ChannelError(FedHEError):
    """A sealed end-to-end message does not open: altered, relabelled or from another peer."""


class TagError(PolicyError):
    """A sum's authentication tags do not verify: it is not the sum the parties contributed."""


class ShareError(FedHEError, ValueError):
    """A multiparty key or decryption share is malformed, or belongs to another ciphertext,
    key-generation round or set of key holders than it is combined with."""


class TensorKindError(FedHEError, TypeError):
    """An encrypted tensor met a plaintext one, or something that is no fedhe tensor at all,
    where one kind of tensor is needed."""
