"""What every job does at the aggregator: declare, set up parties, secure sums, report.

A job subclass (`FedAvgJob`, `RegressionJob`) adds its own phases on top of these steps. Each
secure sum takes whatever replies arrived, excludes (and records) the bad ones, and stops the
job with a clear error below `min_parties` or when the key holder refuses or is unreachable.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedhe import protocol
from fedhe.aggregator.checkpoint import Checkpoint, checkpoint_path
from fedhe.aggregator.roles import Federation
from fedhe.aggregator.session import Exchange, Request, Session
from fedhe.config import JobConfig
from fedhe.crypto import AGGREGATION_PARAMS, CKKSParams, KeyRequest, PublicContext
from fedhe.data.csvdata import find_party_files
from fedhe.data.datasets import Dataset
from fedhe.data.sources import DataSource, site_data_only
from fedhe.errors import FedHEError, ProtocolError
from fedhe.keyholder import DecryptionRequest, JobDeclaration
from fedhe.keyholder.group import KeyHolderGroup
from fedhe.keyholder.member import GroupSpec
from fedhe.keyholder.registry import suffixed
from fedhe.tasks import RELEASE_RULES, aggregate, moments

log = logging.getLogger("fedhe.aggregator")


@dataclass
class JobRun:
    """What one run of a job produced: metrics per round, timings, bytes, audit, extras."""

    job_id: str
    encrypted: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    contributors: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # task-specific result.json entries
    # What the model files need beyond the weights (aggregator/export.py): standardizer, spec.
    model: dict[str, Any] = field(default_factory=dict)
    # What the user reads for each party, by protocol id (party-0 → party-1.csv): `party_names`.
    names: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.metrics or (self.history[-1] if self.history else {})


def party_names(
    source: DataSource, parties: Sequence[str], sites: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The name a user knows each party by, keyed by its protocol id (`party-<index>`, 0-based,
    which MAC labels, identities and the key holder's records are bound to): its site name in a
    deployment (`sites`, from `discover`, which numbers the sites in the order of their names),
    the party's CSV file (`party-2.csv` for index 1) when a simulation reads a data folder, else
    the id itself, whose index is the one --drop-party and --querier take and the audit log
    shows."""
    files = find_party_files(source.data_dir) if _reads_party_files(source) else []
    names = {}
    for party in parties:
        if sites and party in sites:
            names[party] = sites[party]
            continue
        index = party.removeprefix("party-")
        known = index.isdigit() and int(index) < len(files)
        names[party] = files[int(index)].name if known else party
    return names


def _reads_party_files(source: DataSource) -> bool:
    return source.from_csv and not site_data_only(source)


def _part(exchange: Exchange, prefix: str) -> Exchange:
    """The replies and failures of one kind of request in a mixed exchange, keyed by name."""

    def strip(items: Mapping[str, Any]) -> dict[str, Any]:
        return {k.removeprefix(prefix): v for k, v in items.items() if k.startswith(prefix)}

    silent = {k.removeprefix(prefix) for k in exchange.silent if k.startswith(prefix)}
    return Exchange(strip(exchange.replies), strip(exchange.failures), exchange.wall_s, silent)


def contribution_settings(output: str, round_: int) -> dict[str, Any]:
    """What a party tags its contribution with: the output it enters and that output's release
    (0 ≤ round < budget). The key holder releases each (output, round) once."""
    return {"output": output, "release-round": round_}


class Job:
    """Steps shared by every job; subclasses implement `outputs()` and `phases()`."""

    def __init__(
        self,
        session: Session,
        federation: Federation,
        config: JobConfig,
        source: DataSource,
        test: Dataset,
        *,
        encrypted: bool,
        job_id: str,
    ) -> None:
        self.session = session
        self.federation = federation
        self.config = config
        self.source = source
        self.test = test
        self.run = JobRun(job_id, encrypted)
        self.parties = dict(federation.parties)
        self.run.names = party_names(source, list(self.parties), federation.sites)
        self.session.names = self.run.names  # its warnings name parties as the user knows them
        self.samples: dict[str, int] = {}  # per party, as reported at setup
        self.queries: dict[str, int] = {}
        self.later_jobs: list[str] = []  # key-holder jobs this one declared (e.g. inference)
        self.context: PublicContext | None = None
        self.public_bytes = b""
        self.keyholder_identity = b""
        # A key-holder group (`fedhe.keyholder.group`) for an encrypted job of several holders.
        self.group: KeyHolderGroup | None = None
        self.envelopes: dict[str, dict[str, bytes]] = {}  # MAC-key envelopes not yet delivered
        self.context_follows = False  # the parties get the public context with the envelopes
        self.querier: str | None = None  # the party that asks the queries (KNN, MLP)
        self.model_handed_out = False  # the final model reached the parties (chained: no extra)
        self.extra_round_trips = 0  # the sites' shape survey, before the job (aggregator/shape)

    # -- to implement --------------------------------------------------------------------------

    def outputs(self) -> dict[str, tuple[int, aggregate.Layout | int | None]]:
        """Output kinds the key holder may decrypt, with their budget and layout."""
        raise NotImplementedError

    def phases(self) -> None:
        """The job's own protocol, after declaration and party setup."""
        raise NotImplementedError

    def params(self) -> CKKSParams:
        """CKKS parameters of the job's key pair (sums only, by default)."""
        return AGGREGATION_PARAMS

    def keys(self) -> KeyRequest:
        """Evaluation keys the aggregator needs (none for sums)."""
        return KeyRequest()

    def meta(self) -> dict[str, Any]:
        """Task settings the key holder must know (e.g. k for KNN)."""
        return {}

    # -- the common run --------------------------------------------------------------------------

    def execute(self) -> JobRun:
        started = time.perf_counter()
        if self.declares_with_setup:
            self.declare_with_setup()
        else:
            self.declare()
            self.setup_parties()
        self.phases()
        self.finish()
        self.run.timings_s["total"] = time.perf_counter() - started
        self.run.bytes = dict(self.session.bytes)
        self.run.extras["round_trips"] = self.session.round_trips + self.extra_round_trips
        return self.run

    # -- the final model at every site, evaluation where a site opts in -------------------------

    @property
    def evaluates(self) -> bool:
        """Whether this aggregator holds test rows (the built-in split, or test.csv in its
        folder); a deployment's coordinator need not: sites that opt in evaluate instead."""
        return self.test.n_samples > 0

    def adopt_survey(self, excluded: Mapping[str, str], round_trips: int) -> None:
        """The sites left out by the shape survey (`aggregator.shape`), and its round trip."""
        self.exclude(dict(excluded), "shape")
        self.extra_round_trips += round_trips

    def finish(self) -> None:
        """The job's last round trip: the final model to every party (`final_model_requests`)
        and the audit request to the key holders travel in one exchange. A key holder that
        does not answer it is asked again on its own, with the usual retries."""
        requests = {f"model:{name}": r for name, r in self.final_model_requests().items()}
        holders = self._audit_holders()
        requests |= {
            f"audit:{member}": Request(node, protocol.AUDIT, self._audit_request(), "keyholder")
            for member, node in holders.items()
        }
        exchange = self.session.ask_each(requests)
        if any(key.startswith("model:") for key in requests):
            self.take_site_reports(_part(exchange, "model:"))
        audit = _part(exchange, "audit:")
        if self.group is None and "keyholder" not in audit.replies:
            self.run.audit = self.fetch_audit()
            return
        self.run.audit = [
            {**record, "keyholder": member} if self.group is not None else record
            for member in holders
            if member in audit.replies
            for record in json.loads(protocol.config_of(audit.replies[member])["entries"])
        ]

    def final_model_requests(self) -> dict[str, Request]:
        """Every party that took part gets the final model, model.json's content (and a torch
        model's weights), which it keeps at its site; none when the job already sent it along
        with its own last message (encrypted-model mode). A KNN job has none: its "model" is
        the parties' own data."""
        if self.model_handed_out or not self.run.encrypted or self.config.task == "knn":
            return {}
        if not self.run.weights:
            return {}
        from fedhe.aggregator.export import model_spec  # export reads JobRun from this module

        spec = model_spec(self.config, self.run, self.source, self.test)
        content = protocol.content(
            protocol.FINAL_MODEL,
            protocol.REQUEST,
            config={"job-id": self.run.job_id, "model": spec},
            weights=self.run.weights if spec["kind"] == "torch" else None,
        )
        return {
            name: Request(node, protocol.FINAL_MODEL, content, "party")
            for name, node in self.parties.items()
        }

    def take_site_reports(self, exchange: Exchange) -> None:
        """Who got the final model, and the metrics of the sites that evaluated it on their
        own test rows: the job's metrics when this aggregator holds no test set."""
        self.model_handed_out = True
        self.run.extras["model_sent_to"] = sorted(map(self.name_of, exchange.replies))
        if exchange.failures:
            self.run.extras["model_not_delivered"] = {
                self.name_of(name): why for name, why in exchange.failures.items()
            }
        reports = {
            name: protocol.metrics_of(reply)
            for name, reply in exchange.replies.items()
            if protocol.metrics_of(reply).get("n-test")
        }
        sites = {
            self.name_of(name): {k: v for k, v in metrics.items() if k != "n-test"}
            | {"test_rows": int(metrics["n-test"])}
            for name, metrics in sorted(reports.items())
        }
        if self.evaluates:
            evaluation: dict[str, Any] = {"by": "aggregator", "test_rows": self.test.n_samples}
        elif sites:
            first = next(iter(sites))
            self.run.metrics = {k: v for k, v in sites[first].items() if k != "test_rows"}
            evaluation = {"by": first, "test_rows": sites[first]["test_rows"]}
        else:
            evaluation = {"by": None, "note": "no evaluation (no site opted in with test-path)"}
        self.run.extras["evaluation"] = evaluation | ({"sites": sites} if sites else {})

    def declare(self) -> None:
        declaration, keys = self._declaration()
        if self.federation.is_group and self.run.encrypted:
            self.declare_to_group(declaration, keys)
            return
        self._accept_declaration(
            self.ask_keyholder(protocol.DECLARE, self._declare_request(declaration, keys))
        )

    @property
    def declares_with_setup(self) -> bool:
        """Whether the key holder's declaration and the parties' setup can travel in one round
        trip: an encrypted job (not resumed) of a single key holder whose identity discovery
        gave. The parties then seal their MAC seeds to that identity, and the job's public
        context reaches them with their MAC-key envelopes, on the feature moments."""
        return (
            self.run.encrypted
            and not self.federation.is_group
            and not self.config.resume
            and bool(self.federation.identities.get("keyholder"))
        )

    def declare_with_setup(self) -> None:
        declaration, keys = self._declaration()
        request = self._declare_request(declaration, keys)
        identity = self.federation.identities["keyholder"]
        requests = {
            "declare": Request(self.federation.keyholder, protocol.DECLARE, request, "keyholder")
        }
        for name, content in self._setup_contents({"keyholder-identity": identity}, True).items():
            requests[f"setup:{name}"] = Request(
                self.parties[name], protocol.SETUP, content, "party"
            )
        exchange = self.session.ask_each(requests)
        reply = exchange.replies.get("declare")
        if reply is None:  # that exchange was the first try; a silent key holder gets the rest
            reason = exchange.failures.get("declare", "")
            if "declare" not in exchange.silent or self.config.keyholder_retries == 0:
                raise ProtocolError(f"key holder refused or failed {protocol.DECLARE}: {reason}")
            retries = self.config.keyholder_retries - 1
            reply = self.ask_keyholder(protocol.DECLARE, request, retries=retries)
        self._accept_declaration(reply)
        if self.keyholder_identity != identity:
            raise ProtocolError(
                "the key holder declared the job under another identity than the one it gave "
                "at discovery, which the parties sealed their MAC seeds to: refusing to go on."
            )
        self.context_follows = True
        self._take_setup(_part(exchange, "setup:"))

    def _declaration(self) -> tuple[JobDeclaration, KeyRequest]:
        declaration = aggregate.declare(
            self.run.job_id,
            outputs=self.outputs(),
            min_parties=self.config.min_parties,
            encrypted=self.run.encrypted,
            params=self.params(),
            task=self.config.task,
            meta=self.meta(),
        )
        self.run.params = self.params().to_dict()
        return declaration, self.keys()

    @staticmethod
    def _declare_request(declaration: JobDeclaration, keys: KeyRequest) -> RecordDict:
        return protocol.content(
            protocol.DECLARE,
            protocol.REQUEST,
            config={"declaration": declaration.to_dict(), "keys": keys.to_dict()},
        )

    def _accept_declaration(self, reply: RecordDict) -> None:
        self.run.timings_s["keygen"] += protocol.metrics_of(reply)["keygen-s"]
        public = protocol.payload_of(reply)["public-context"]
        # The aggregator, like every party, accepts only a public context (raises on a secret key).
        self.context = PublicContext.from_bytes(public) if public else None
        self.public_bytes = public
        self.keyholder_identity = protocol.payload_of(reply).get("keyholder-identity", b"")

    def declare_to_group(self, declaration: JobDeclaration, keys: KeyRequest) -> None:
        """Set up the job's keys with every member of the key-holder group (N-of-N)."""
        started = time.perf_counter()
        spec = GroupSpec(
            tuple(self.federation.keyholders),
            self.config.decryption_threshold,
            self.federation.identities,
        )
        self.group = KeyHolderGroup(spec, self._group_transport)
        self.public_bytes = self.group.declare(declaration, keys)
        self.context = self.group.contexts[declaration.job_id]
        self.run.timings_s["keygen"] += time.perf_counter() - started
        self.run.extras["keyholders"] = {"members": list(spec.members), "threshold": spec.threshold}

    def _group_transport(
        self, step: str, messages: dict[str, tuple[dict[str, Any], dict[str, bytes]]]
    ) -> tuple[dict[str, tuple[dict[str, Any], dict[str, bytes]]], dict[str, str]]:
        """One group step to the named members over Flower (`fedhe.keyholder.group.Transport`)."""
        exchange = self.session.ask(
            {m: self.federation.keyholders[m] for m in messages},
            protocol.GROUP,
            {
                m: protocol.content(
                    protocol.GROUP,
                    protocol.REQUEST,
                    config={**config, "step": step},
                    payload=payload,
                )
                for m, (config, payload) in messages.items()
            },
            role="keyholder",
        )
        replies = {
            m: (protocol.config_of(r), protocol.payload_of(r)) for m, r in exchange.replies.items()
        }
        for reply in exchange.replies.values():
            self.run.timings_s["decrypt"] += protocol.metrics_of(reply).get("keyholder-s", 0.0)
        return replies, dict(exchange.failures)

    @property
    def keyholder_names(self) -> list[str]:
        """The key holders a party registers with: the group's members, or the one ("")."""
        return list(self.group.spec.members) if self.group is not None else [""]

    def setup_parties(self) -> None:
        keyholders = (
            {"public-context": self.public_bytes, **self._keyholder_identities()}
            if self.public_bytes
            else {}
        )
        contents = self._setup_contents(keyholders, False)
        self._take_setup(self.session.ask(self.parties, protocol.SETUP, contents, role="party"))

    def _setup_contents(
        self, payload: dict[str, bytes], context_follows: bool
    ) -> dict[str, RecordDict]:
        return {
            name: protocol.content(
                protocol.SETUP,
                protocol.REQUEST,
                config={
                    "job-id": self.run.job_id,
                    "source": self.source.to_dict(),
                    "party-index": index,
                    "n-parties": len(self.parties),
                    "querier": name == self.querier,
                    **({"context-follows": True} if context_follows else {}),
                },
                payload=payload,
            )
            for name, index in self._party_indexes().items()
        }

    def _take_setup(self, exchange: Exchange) -> None:
        self.samples = {
            name: int(protocol.metrics_of(reply)["n-samples"])
            for name, reply in exchange.replies.items()
        }
        self.queries = {  # how many test rows a party holds to query with (KNN, MLP)
            name: int(protocol.metrics_of(reply).get("n-queries", 0))
            for name, reply in exchange.replies.items()
        }
        self.exclude(exchange.failures, "setup")
        self.require_quorum("setup")
        if self.context is not None:
            self.register_parties(exchange)

    def _party_indexes(self) -> dict[str, int]:
        """Each remaining party's index among all the job's parties: a party left out before
        setup (the shape survey) leaves the others' indexes, and so their ids, as they are."""
        order = list(self.federation.parties)
        return {name: order.index(name) for name in self.parties}

    def _keyholder_identities(self) -> dict[str, bytes]:
        if self.group is None:
            return {"keyholder-identity": self.keyholder_identity}
        return {
            f"keyholder-identity/{m}": self.group.spec.identities[m]
            for m in self.group.spec.members
        }

    def register_parties(self, setup: Exchange) -> None:
        """Relay each party's sealed seed to each key holder and its sealed envelope back: the
        job's MAC key (one per member of a group), which this aggregator never learns
        (`fedhe.keyholder.registry`)."""
        members = self.keyholder_names
        for name, reply in setup.replies.items():
            link = protocol.payload_of(reply)
            if not link.get("identity") or not all(
                link.get(suffixed("mac-seed", m)) for m in members
            ):
                self.exclude({name: "its setup reply has no end-to-end link"}, "registration")
        self.require_quorum("registration")
        envelopes: dict[str, dict[str, bytes]] = {name: {} for name in self.parties}
        for member, reply in self._register_with(members, setup).items():
            self.exclude(dict(protocol.config_of(reply).get("refused", {})), "registration")
            self.require_quorum("registration")
            for name, envelope in protocol.payload_of(reply).items():
                envelopes.setdefault(name.removeprefix("envelope/"), {})[
                    suffixed("envelope", member)
                ] = envelope
        # Each envelope rides on the job's next party message (the feature moments), which
        # saves a round trip; a party opens it before it contributes anything.
        self.envelopes = {name: envelopes[name] for name in self.parties}

    def _register_with(self, members: list[str], setup: Exchange) -> dict[str, RecordDict]:
        """Every key holder's registration reply, asked at once. In a group a silent member is
        left out (it cannot check tags, so it never shares) while the threshold holds."""
        contents = {}
        for member in members:
            payload: dict[str, bytes] = {}
            for name in self.parties:
                link = protocol.payload_of(setup.replies[name])
                payload[f"identity/{name}"] = link["identity"]
                payload[f"mac-seed/{name}"] = link[suffixed("mac-seed", member)]
            contents[member] = protocol.content(
                protocol.REGISTER,
                protocol.REQUEST,
                config={"job-id": self.run.job_id, "parties": sorted(self.parties)},
                payload=payload,
            )
        if self.group is None:
            return {"": self.ask_keyholder(protocol.REGISTER, contents[""])}
        exchange = self.session.ask(
            {m: self.federation.keyholders[m] for m in members},
            protocol.REGISTER,
            contents,
            role="keyholder",
        )
        refused = {m: r for m, r in exchange.failures.items() if m not in exchange.silent}
        if refused:
            raise ProtocolError(f"key holders refused the registration: {refused}")
        self.group.silent |= set(exchange.failures)
        if len(exchange.replies) < self.group.spec.threshold:
            raise ProtocolError(
                f"only {len(exchange.replies)} key holders registered the parties, fewer than "
                f"the threshold {self.group.spec.threshold}: silent {sorted(exchange.failures)}."
            )
        return dict(exchange.replies)

    def feature_moments(self, *, with_target: bool = False) -> tuple[moments.Standardizer, int]:
        """Global standardization and Σnᵢ by one secure sum: no party's own statistics leak."""
        config = {
            "job-id": self.run.job_id,
            "sum-bound": moments.SUM_BOUND,
            "with-target": with_target,
            **contribution_settings(moments.OUTPUT, 0),
        }
        contents = {
            name: protocol.content(
                protocol.MOMENTS,
                protocol.REQUEST,
                config=config,
                payload={**self.envelopes.get(name, {}), **self._context_if_it_follows()},
            )
            for name in self.parties
        }
        self.envelopes = {}
        self.context_follows = False
        exchange = self.session.ask(self.parties, protocol.MOMENTS, contents, role="party")
        self.exclude(exchange.failures, "moments")
        self.require_quorum("moments")
        layout = self.moments_layout(self.test.n_features + int(with_target))
        flat = self.secure_sum(exchange, layout, moments.OUTPUT, moments.SUM_BOUND, round_=0)
        averaged, total_samples = aggregate.average_update(flat, layout)
        standardizer = moments.Standardizer.from_moments(
            averaged["mean"],
            averaged["meansq"],
            with_target=with_target,
            observed=averaged.get(moments.OBSERVED),
            total_samples=round(total_samples),
            names=self.test.feature_names,
        )
        # An imputing job's test rows get the same global means as the parties' rows.
        self.test = replace(self.test, X=standardizer.fill_missing(self.test.X))
        return standardizer, round(total_samples)

    def _context_if_it_follows(self) -> dict[str, bytes]:
        """The job's public context, on the first party message after a setup that came
        without it (`declare_with_setup`)."""
        return {"public-context": self.public_bytes} if self.context_follows else {}

    def moments_layout(self, n_columns: int) -> aggregate.Layout:
        """The moments sum's layout; an imputing job also sums the observed fraction."""
        return moments.layout(n_columns, observed=self.source.imputes)

    def secure_sum(
        self,
        exchange: Exchange,
        layout: aggregate.Layout,
        output: str,
        sum_bound: float,
        *,
        min_scale_bits: int | None = None,
        packing: str = aggregate.COMPLEX,
        parties: int | None = None,
        round_: int,
    ) -> np.ndarray:
        """Sum the contributions that arrived and validate; return what the key holder releases
        (it checks the sum against the parties' sealed tags, which this aggregator relays)."""
        contributions = {
            name: protocol.payload_of(reply)["contribution"]
            for name, reply in exchange.replies.items()
        }
        self.account(exchange)
        started = time.perf_counter()
        total = aggregate.aggregator_sum(
            contributions,
            layout,
            self.context,
            sum_bound=sum_bound,
            min_parties=self.config.min_parties,
            min_scale_bits=min_scale_bits,
            packing=packing,
            parties=parties,
        )
        self.run.timings_s["compute"] += time.perf_counter() - started
        for name, reason in total.rejected.items():
            self.run.excluded.setdefault(name, f"{output}: {reason}")
        self.run.contributors.append({"output": output, "parties": sorted(total.contributors)})
        tags = {
            member: {
                name: protocol.payload_of(reply).get(suffixed("tag", member), b"")
                for name, reply in exchange.replies.items()
                if name in total.contributors
            }
            for member in self.keyholder_names
        }
        released = self.release(output, total.tensor, total.contributors, round_=round_, tags=tags)
        return protocol.array_from_bytes(released["values"])

    def release(
        self,
        output: str,
        tensor: bytes,
        contributors: Sequence[str],
        *,
        job_id: str | None = None,
        round_: int = 0,
        tags: dict[str, dict[str, bytes]] | None = None,
    ) -> dict[str, bytes]:
        """Ask the key holder for `output` of `tensor` (over `contributors`), the release of
        `round_`: what it releases for that output kind, as message payload. `tags`: each
        contributor's sealed tag, per key holder ("" for a single one)."""
        if self.group is not None:
            request = DecryptionRequest(
                job_id or self.run.job_id, output, tuple(sorted(contributors)), tensor, round_
            )
            return self._release_by_group(self.group, request, tags or {})
        tags = (tags or {}).get("", {})
        reply = self.ask_keyholder(
            protocol.DECRYPT,
            protocol.content(
                protocol.DECRYPT,
                protocol.REQUEST,
                config={
                    "job-id": job_id or self.run.job_id,
                    "output": output,
                    "round": round_,
                    "contributors": sorted(contributors),
                },
                payload={"tensor": tensor, **{f"tag/{k}": v for k, v in (tags or {}).items()}},
            ),
        )
        self.run.timings_s["decrypt"] += protocol.metrics_of(reply)["decrypt-s"]
        return protocol.payload_of(reply)

    def _release_by_group(
        self,
        group: KeyHolderGroup,
        request: DecryptionRequest,
        tags: dict[str, dict[str, bytes]],
    ) -> dict[str, bytes]:
        """Threshold decryption: a verified sum owed to this aggregator comes back as values it
        combines from the shares; anything else as what the lead's step releases."""
        clear = request.output_kind in RELEASE_RULES.clear
        try:
            avoid = [self.querier] if self.querier else []
            released = group.decrypt(request, tags, clear=clear, avoid_lead=avoid)
        except FedHEError as err:
            raise ProtocolError(f"key-holder group: {err}") from err
        if group.silent:
            self.run.extras["silent_keyholders"] = sorted(group.silent)
        if clear:
            return {"values": protocol.array_to_bytes(np.asarray(released))}
        return dict(released[1])

    def ask_parties(self, message_type: str, config: dict[str, Any], **records: Any) -> Exchange:
        return self.session.ask(
            self.parties,
            message_type,
            protocol.content(
                message_type,
                protocol.REQUEST,
                config={"job-id": self.run.job_id, **config},
                **records,
            ),
            role="party",
        )

    def ask_party(
        self, name: str, message_type: str, settings: dict[str, Any], **records: Any
    ) -> RecordDict:
        """One party's reply (the querier, say); the job cannot go on without it."""
        if name not in self.parties:
            why = self.run.excluded.get(name)
            left = sorted(map(self.name_of, self.parties))
            raise ProtocolError(
                f"{self.name_of(name)} is not among the parties left: {left}"
                + (f"; left out at {why}" if why else ".")
            )
        exchange = self.session.ask(
            {name: self.parties[name]},
            message_type,
            protocol.content(
                message_type,
                protocol.REQUEST,
                config={"job-id": self.run.job_id, **settings},
                **records,
            ),
            role="party",
        )
        self.account(exchange)
        if name not in exchange.replies:
            raise ProtocolError(
                f"{self.name_of(name)} failed {message_type}: {exchange.failures.get(name)}"
            )
        return exchange.replies[name]

    def ask_keyholder(
        self,
        message_type: str,
        content: RecordDict,
        *,
        member: str = "",
        retries: int | None = None,
    ) -> RecordDict:
        """The job cannot go on without the key holder: a refusal stops it at once, silence
        after `keyholder_retries` more tries (a retried decryption is replayed by the key
        holder, not decrypted again). `member`: one member of a key-holder group (default:
        the single key holder, or a group's first member for a plaintext twin)."""
        reason = ""
        node = self.federation.keyholders[member] if member else self.federation.keyholder
        retries = self.config.keyholder_retries if retries is None else retries
        for attempt in range(retries + 1):
            exchange = self.session.ask(
                {"keyholder": node}, message_type, content, role="keyholder"
            )
            if "keyholder" in exchange.replies:
                return exchange.replies["keyholder"]
            reason = exchange.failures.get("keyholder", "")
            if "keyholder" not in exchange.silent:
                break
            log.warning("key holder silent on %s (try %d): %s", message_type, attempt + 1, reason)
        raise ProtocolError(f"key holder refused or failed {message_type}: {reason}")

    def fetch_audit(self) -> list[dict[str, Any]]:
        """The single key holder's records of this job and of the jobs it declared after it
        (in order: one contiguous stretch of the hash chain), asked on their own."""
        reply = self.ask_keyholder(protocol.AUDIT, self._audit_request())
        return json.loads(protocol.config_of(reply)["entries"])

    def _audit_request(self) -> RecordDict:
        return protocol.content(
            protocol.AUDIT,
            protocol.REQUEST,
            config={"job-id": self.run.job_id, "later-jobs": json.dumps(self.later_jobs)},
        )

    def _audit_holders(self) -> dict[str, int]:
        """Who keeps this job's audit log: the key holder, or each group member still alive (a
        silent one's log stays on its disk)."""
        if self.group is None:
            return {"keyholder": self.federation.keyholder}
        return {
            m: self.federation.keyholders[m]
            for m in self.group.spec.members
            if m not in self.group.silent
        }

    # -- checkpoints -------------------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return checkpoint_path(self.config.out, self.run.encrypted)

    def resumable(self) -> Checkpoint | None:
        """This job's checkpoint when the run resumes it (same job id), else None."""
        if not self.config.resume:
            return None
        checkpoint = Checkpoint.load(self.checkpoint_path)
        if checkpoint is None or checkpoint.job_id != self.run.job_id:
            return None
        self.run.history = checkpoint.history
        self.run.contributors = checkpoint.contributors
        self.run.excluded.update(checkpoint.excluded)
        self.run.extras["resumed_after_round"] = checkpoint.round
        return checkpoint

    def save_checkpoint(self, **state: Any) -> None:
        Checkpoint(
            self.run.job_id,
            history=self.run.history,
            contributors=self.run.contributors,
            excluded=self.run.excluded,
            **state,
        ).save(self.checkpoint_path)

    def note_dropped(self, failures: dict[str, str], phase: str) -> None:
        """Record parties missing from one sum (they may come back in the next)."""
        for name, reason in failures.items():
            self.run.excluded.setdefault(name, f"{phase}: {reason}")

    def exclude(self, failures: dict[str, str], phase: str) -> None:
        for name, reason in failures.items():
            self.run.excluded[name] = f"{phase}: {reason}"
            self.parties.pop(name, None)

    def require_quorum(self, phase: str) -> None:
        if len(self.parties) < self.config.min_parties:
            excluded = {self.name_of(name): why for name, why in self.run.excluded.items()}
            raise ProtocolError(
                f"after {phase}, {len(self.parties)} parties remain, fewer than "
                f"min_parties={self.config.min_parties}; excluded: {excluded}"
            )

    def name_of(self, party: str) -> str:
        """The party as the user knows it (`party_names`)."""
        return self.run.names.get(party, party)

    def account(self, exchange: Exchange) -> None:
        """Time the parties reported (encryption) and the rest of the exchange (transfer)."""
        reported = [protocol.metrics_of(r) for r in exchange.replies.values()]
        slowest = max(
            (m.get("encrypt-s", 0.0) + m.get("train-s", 0.0) for m in reported), default=0.0
        )
        self.run.timings_s["encrypt"] += max(
            (m.get("encrypt-s", 0.0) for m in reported), default=0.0
        )
        self.run.timings_s["transfer"] += max(0.0, exchange.wall_s - slowest)
