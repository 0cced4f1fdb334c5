"""`atoll run evaluate`: the ServerApp's evaluation mode, a Flower run that trains nothing.

It is the same ServerApp (and so the same app bundle the sites approved) started with ``evaluate-run`` in the run
config: instead of training it reads the finished (or interrupted) run's folder on the SuperLink host, and sends
every site, on the run's own round config (so each site's approved manifest still matches), first the chosen
round's global model and then each site's last released local model (server.released_updates). Each site scores
each model on its validation split through the ClientApp's evaluate path, which touches neither the budget guard
nor the ledger: no epsilon is charged. What comes back is what the site's policy releases, signed by the site
(contract.wire.evaluation_statement), so that replies are tied to the enrolled site and to the weights scored
even when no training reply of this run has bound the site's Flower node.

Output in the run folder: ``evaluation.json`` (server.evaluate_matrix) and ``evaluation-heatmap.png|svg``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from contract import Mechanism, TaskSpec, wire
from server.evaluate_heatmap import write_heatmap
from server.evaluate_matrix import Cell, EvaluationMatrix, ModelRow, evaluated_cell
from server.released_updates import last_released
from server.settings import RunSettings, SettingsError

log = logging.getLogger("atoll.server")

EVALUATE_RUN_KEY, EVALUATE_ROUND_KEY, EVALUATE_ID_KEY = "evaluate-run", "evaluate-round", "evaluate-id"
EVALUATION_FILE = "evaluation.json"
HEATMAP_STEM = "evaluation-heatmap"
GLOBAL = "global"


class EvaluationError(ValueError):
    """The run folder cannot be evaluated as asked (no such round, no settings); the message says what to do."""


def is_evaluation_run(run_config: dict) -> bool:
    return bool(str(run_config.get(EVALUATE_RUN_KEY, "") or "").strip())


def load_run_settings(root: Path) -> RunSettings:
    """The settings a run folder was trained with (its settings.json, as RunOutputs wrote it)."""
    path = Path(root) / "settings.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"{root} is not a run folder (no settings.json); give RUN_DIR/<run-name>") from None
    except ValueError as exc:
        raise EvaluationError(f"{path} is not valid JSON ({exc})") from None
    task = {k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("task", {}).items()}
    mech = data.pop("mechanism", {})
    opts = data.pop("server_options", {})
    names = {f.name for f in dataclasses.fields(RunSettings)}
    try:
        from contract.server_options import ServerOptions

        return RunSettings(**{k: v for k, v in data.items() if k in names}, task=TaskSpec(**task),
                           mechanism=Mechanism(**mech), server_options=ServerOptions(**opts))
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{path} does not hold this Atoll's run settings ({exc})") from None


def completed_rounds(root: Path) -> list[int]:
    """Rounds whose global weights the run saved (0 = the initial model)."""
    folder = Path(root) / "weights"
    return sorted(int(p.stem[6:]) for p in folder.glob("round-*.pt") if p.stem[6:].isdigit())  # not -ema


def chosen_round(root: Path, requested: int) -> int:
    """``requested`` if the run saved that round's global weights; 0 = the last completed round."""
    rounds = [r for r in completed_rounds(root) if r > 0]
    if not rounds:
        raise EvaluationError(f"run {Path(root).name} has no completed round to evaluate (no weights/round-NNN.pt "
                              "beyond the initial model)")
    if requested <= 0:
        return rounds[-1]
    if requested not in rounds:
        raise EvaluationError(f"run {Path(root).name} has no global model of round {requested}; completed rounds: "
                              f"{', '.join(map(str, rounds))}")
    return requested


def history_sites(root: Path) -> list[str]:
    """The sites the run's history names (not unbound ``node-<id>`` entries)."""
    try:
        history = json.loads((Path(root) / "history.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted({s for e in history for s, v in e.get("sites", {}).items()
                   if not s.startswith("node-") and v.get("verified", True)})


def models_to_evaluate(root: Path, settings: RunSettings, rnd: int) -> tuple[list[tuple[ModelRow, Path]], list[str]]:
    """The global model of round ``rnd`` and each site's last released local model up to it; and notes."""
    from models import state_dict_sha256

    import torch

    root = Path(root)
    rows: list[tuple[ModelRow, Path]] = []
    from server.server_ema import ema_path

    g = root / "weights" / f"round-{rnd:03d}.pt"
    rows.append((ModelRow(GLOBAL, "global", rnd, weights_sha256=state_dict_sha256(torch.load(g, weights_only=True))),
                 g))
    notes: list[str] = []
    if settings.secagg:
        notes.append("SecAgg+ run: the server only ever saw the masked sum of the sites' updates, never one site's "
                     "update, so only the global model is evaluated")
        return rows, notes
    kept = last_released(root, rnd)
    for site in sorted(kept):
        r, path = kept[site]
        sd = torch.load(path, weights_only=True)
        rows.append((ModelRow(f"{site} local", "local", r, site=site, weights_sha256=state_dict_sha256(sd)), path))
    ema = ema_path(g)
    if ema.is_file():  # the server's EMA of the global model (server-ema > 0)
        rows.insert(1, (ModelRow(f"{GLOBAL} EMA", "global", rnd,
                                 weights_sha256=state_dict_sha256(torch.load(ema, weights_only=True))), ema))
    missing = [s for s in history_sites(root) if s not in kept]
    if missing:
        notes.append(f"no released update kept up to round {rnd} for {', '.join(missing)} (the site contributed no "
                     "accepted update, or the run predates this Atoll): no local model of it is evaluated")
    return rows, notes


def chosen_threshold(root: Path, settings: RunSettings, rnd: int) -> float | None:
    """The threshold round ``rnd`` chose from the sites' released validation counts, if the run decides by it."""
    if settings.server_options.decision_threshold != "validation":
        return None
    try:
        history = json.loads((Path(root) / "history.json").read_text())
    except (OSError, ValueError):
        return None
    entry = next((e for e in history if isinstance(e, dict) and e.get("round") == rnd), {})
    return (entry.get("decision_threshold") or {}).get("threshold")


class ReplyJudge:
    """Who answered for one model, and whether the answer is that site's (DESIGN.md "Trust and transport").

    A node bound to a site (consortium registry, or an earlier signed reply of this run) speaks for it. An unbound
    node is believed only when its reply carries a statement signed by the enrolled key of the site it names, over
    these very weights and these very metrics; it is then bound for the rest of the run. Without enrolled keys (the
    unverified local demo) names are taken as claimed.
    """

    def __init__(self, trust, keys_dir: str, run_id: str, server_round: int, task: TaskSpec) -> None:
        self.trust, self.keys_dir, self.run_id, self.server_round = trust, keys_dir, run_id, server_round
        self.task = task
        self.decision_threshold: float | None = None  # the run's chosen threshold (decision-threshold = validation)
        self._keys: dict[str, Any] = {}

    def _statement_problem(self, statement: dict | None, site: str, weights_sha256: str, content) -> str | None:
        from privacy.keys import KeyFileError, load_public_key
        from privacy.ledger import LedgerError, verify_record

        if statement is None:
            return "the reply carries no signed evaluation statement"
        if statement.get("kind") != wire.EVALUATION_STATEMENT or statement.get("site") != site:
            return f"the signed statement is not an evaluation by site {site!r}"
        if statement.get("run_id") != self.run_id or statement.get("server_round") != self.server_round:
            return "the signed statement is for another run or round"
        if statement.get("weights_sha256") != weights_sha256:
            return "the signed statement names other weights than the model sent"
        if statement.get("released_sha256") != wire.released_sha256(content):
            return "the released metrics are not the ones the site signed"
        if not self.keys_dir:
            return "no enrolled keys to check the signature against"
        try:
            if site not in self._keys:
                self._keys[site] = load_public_key(Path(self.keys_dir) / f"{site}.pub")
            verify_record(statement, self._keys[site])
        except (KeyFileError, LedgerError, OSError) as exc:
            return f"signature check failed: {str(exc).splitlines()[0][:200]}"
        return None

    def judge(self, msg, weights_sha256: str) -> tuple[str, Cell]:
        """(column name, cell) for one reply; the name is ``node-<id>`` when the reply is not the site's."""
        node = msg.metadata.src_node_id
        bound = self.trust.site_of(node)
        if msg.has_error():
            return bound or f"node-{node}", Cell("error", code="NODE_ERROR", message=str(msg.error.reason)[:300])
        content = msg.content
        claimed = wire.site_name_of(content)
        refusal = wire.refusal_of(content)
        statement = wire.attestation_of(content)
        if not self.trust.verified:  # the unverified local demo: names as claimed, nothing checked
            name = claimed or bound or f"node-{node}"
            if refusal:
                return name, Cell("refused", code=refusal[0], message=refusal[1])
            return name, self._cell(content, signed=False)
        if bound is not None and claimed not in (None, bound):
            return f"node-{node}", Cell("ignored", code="NODE_NOT_SITE",
                                        message=f"node {node} is bound to site {bound!r} but names {claimed!r}")
        name = bound or claimed
        if refusal:  # unsigned, but carries no metrics: shown under the site it names when that site is free
            if bound is None and (not claimed or self.trust.may_bind(node, claimed) is not None):
                return f"node-{node}", Cell("ignored", code=refusal[0], message="refusal from a node not bound "
                                            f"to any site: {refusal[1]}"[:300])
            return str(name), Cell("refused", code=refusal[0], message=refusal[1])
        if wire.METRICS not in content.metric_records or not name:
            return name or f"node-{node}", Cell("ignored", code="MALFORMED_REPLY",
                                                message="the reply carries no metrics or names no site")
        problem = self._statement_problem(statement, name, weights_sha256, content)
        if bound is not None:
            if problem and statement is not None:  # a signature that does not verify is worse than none
                return f"node-{node}", Cell("ignored", code="STATEMENT_REJECTED", message=problem)
            return name, self._cell(content, signed=problem is None)
        if problem:
            return f"node-{node}", Cell("ignored", code="NOT_VERIFIED",
                                        message=f"node {node} names site {name!r}: {problem}")
        why = self.trust.may_bind(node, name)
        if why:
            return f"node-{node}", Cell("ignored", code="NODE_NOT_ENROLLED", message=why)
        self.trust.bind(node, name)
        return name, self._cell(content, signed=True)

    def _cell(self, content, *, signed: bool) -> Cell:
        released = {str(k): float(v) for k, v in content[wire.METRICS].items()}
        return evaluated_cell(self.task, released, wire.missing_of(content), signed=signed,
                              decision_threshold=self.decision_threshold)


def run_evaluation(grid, root: Path, requested_round: int = 0, *, evaluate_id: str = "",
                   flower_run_id: int | None = None) -> EvaluationMatrix:
    """Evaluate the run in ``root`` on every connected site; writes evaluation.json and the heatmap."""
    from flwr.app import ArrayRecord

    import torch

    from server.app import build_strategy, check_trust

    root = Path(root)
    settings = load_run_settings(root)
    rnd = chosen_round(root, requested_round)
    run_name = root.name
    trust = check_trust(settings)
    rows, notes = models_to_evaluate(root, settings, rnd)
    matrix = EvaluationMatrix(settings.task, run_name, rnd, models=[r for r, _ in rows], notes=notes)
    for site in history_sites(root):
        matrix.sites.append(site)
    judge = ReplyJudge(trust, settings.keys_dir, run_name, rnd, settings.task)
    judge.decision_threshold = chosen_threshold(root, settings, rnd)
    strategy = build_strategy(settings)
    cfg = settings.round_config(run_name, rnd)
    log.info("evaluating run %s round %d: %d model(s) on every site's validation split (no training, no privacy "
             "charge)", run_name, rnd, len(rows))
    for row, path in rows:
        arrays = ArrayRecord(torch.load(path, weights_only=True))
        messages = strategy.configure_evaluate(rnd, arrays, cfg.to_record(), grid)
        for msg in grid.send_and_receive(messages, timeout=settings.round_timeout):
            name, cell = judge.judge(msg, row.weights_sha256)
            if cell.status == "ignored":
                matrix.notes.append(f"{row.name}: ignored a reply from {name} [{cell.code}]: {cell.message}")
                log.warning("evaluation of %s: ignored a reply from %s [%s]: %s", row.name, name, cell.code,
                            cell.message)
                continue
            matrix.put(row.name, name, cell)
        log.info("evaluated %s (round %d) at %d site(s)", row.name, row.round,
                 sum(1 for (m, _), c in matrix.cells.items() if m == row.name and c.status == "evaluated"))
    path = write_outputs(root, matrix, evaluate_id=evaluate_id, flower_run_id=flower_run_id)
    log.info("evaluation of run %s written to %s:\n%s", run_name, path, "\n".join(matrix.lines()))
    return matrix


def write_outputs(root: Path, matrix: EvaluationMatrix, *, evaluate_id: str = "",
                  flower_run_id: int | None = None, status: str = "completed", reason: str = "") -> Path:
    """evaluation.json (atomically) and the heatmap beside it; returns the JSON's path."""
    from server.outputs import _atomic_write

    picture = write_heatmap(matrix, Path(root) / HEATMAP_STEM) if status == "completed" else None
    body = {**matrix.as_dict(), "status": status, "evaluate_id": evaluate_id, "flower_run_id": flower_run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heatmap": picture.name if picture else None}
    if reason:
        body["reason"] = reason
    path = Path(root) / EVALUATION_FILE
    _atomic_write(path, json.dumps(body, indent=2))
    return path


def main_evaluate(grid, run_config: dict, flower_run_id: int | None) -> None:
    """The ServerApp's entry in evaluation mode (``evaluate-run`` set in the run config)."""
    root = Path(str(run_config[EVALUATE_RUN_KEY]))
    evaluate_id = str(run_config.get(EVALUATE_ID_KEY, "") or "")
    try:
        requested = int(run_config.get(EVALUATE_ROUND_KEY, 0) or 0)
    except (TypeError, ValueError):
        raise SettingsError(f"run config '{EVALUATE_ROUND_KEY}' must be a round number, got "
                            f"{run_config.get(EVALUATE_ROUND_KEY)!r}") from None
    try:
        run_evaluation(grid, root, requested, evaluate_id=evaluate_id, flower_run_id=flower_run_id)
    except (EvaluationError, SettingsError) as exc:
        try:  # tell `atoll run evaluate --wait` why, then fail the Flower run
            task = load_run_settings(root).task
            write_outputs(root, EvaluationMatrix(task, root.name, requested), evaluate_id=evaluate_id,
                          flower_run_id=flower_run_id, status="failed", reason=str(exc))
        except (EvaluationError, OSError):
            pass  # no run folder to write into: Flower's own status carries the error
        raise
