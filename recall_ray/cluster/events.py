"""What the job survived, said aloud: every actor restart, task retry and resumed shard is
one console line (a warning of the stage's logger, so it reaches the console and job.log)
and one record in the stage's result, which the manifest lists under `events`. An
operator reads a flaky node there instead of finding the run merely slower."""

from __future__ import annotations

import logging


def short(node_id: str | None) -> str:
    """A node or actor id as the console shows it (its first 8 hex digits)."""
    return (node_id or "?")[:8]


def report(events: list[dict], log: logging.Logger, stage: str, kind: str, text: str, **fields) -> dict:
    """Append one event {kind, **fields} to `events` and say it on one line."""
    event = {"kind": kind, **fields}
    events.append(event)
    log.warning("%s: %s", stage, text)
    return event


def actor_restarts(actor_id: str) -> tuple[int, str | None]:
    """(how many times the actor was restarted, the node it lives on now), from the GCS's
    actor table (no dashboard needed; one small request)."""
    from ray._private.state import actors  # the table ray.util.state reads too, without the dashboard

    info = actors(actor_id) or {}
    return int(info.get("NumRestarts", 0) or 0), (info.get("Address") or {}).get("NodeID")


class RestartNote:
    """Mixed into a Ray Data pool's callable class (representations, evaluation): its actor
    says, on the first batch it returns after Ray restarted it, `"<actor id> <node id>"`
    (`restart_note()`; "" otherwise), which the driver turns into an event. Ray Data
    restarts its actors and retries their batches without limit."""

    def _remember_restart(self) -> None:
        import ray

        self._restart = ""
        if not ray.is_initialized():  # called outside Ray (a test): nothing restarts it
            return
        ctx = ray.get_runtime_context()
        restarted = ctx.get_actor_id() is not None and ctx.was_current_actor_reconstructed
        self._restart = f"{ctx.get_actor_id()} {ctx.get_node_id()}" if restarted else ""

    def restart_note(self) -> str:
        note, self._restart = getattr(self, "_restart", ""), ""
        return note


def report_pool_restart(events: list[dict], log: logging.Logger, stage: str, note: str, what: str, first: str) -> None:
    """The event of a Ray Data actor's RestartNote: `what` names the pool's actor, `first`
    the work it finished first after the restart."""
    actor, node = note.split()
    count, _ = actor_restarts(actor)
    report(events, log, stage, "actor_restart",
           f"{what} {short(actor)} restarted on node {short(node)} (restart {count}; Ray Data restarts it and retries"
           f" its batches without limit); the batches it held were retried, the first done after the restart: {first}",
           actor=actor, node=node, restarts=count, retries_left="unlimited", shard=first)
