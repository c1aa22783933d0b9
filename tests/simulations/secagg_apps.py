"""ClientApps for the secure-aggregation simulation tests: our real ClientApp, with one secure
aggregation stage changed for chosen (round, partition) pairs: a client that fails there, or one
whose reply is malformed. Shared by test_secure_federated.py and
test_distributed_noise_federated.py."""

from __future__ import annotations

from collections.abc import Callable

from client.client_app import make_client_app


def with_secagg_stage(cfg, stage: Callable) -> object:
    """Our ClientApp for ``cfg``, except that each secure-aggregation stage message goes through
    ``stage(inner, msg, context)`` (``inner``: the real app) instead of the real app alone."""
    from flwr.clientapp import ClientApp

    inner = make_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        return inner(msg, context)

    @app.train("secagg")
    def secagg(msg, context):
        return stage(inner, msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return inner(msg, context)

    return app


def failing_client_app(cfg, fail_at_masked_input: dict[int, set[int]]):
    """Our ClientApp, except that partition ``p`` raises at the masked-input stage of round ``r`` for
    ``p in fail_at_masked_input[r]`` (after sharing its keys: the others mask with it)."""

    def stage(inner, msg, context):
        request, pid = msg.content["secagg"], int(context.node_config["partition-id"])
        if request["stage"] == "masked_input" and pid in fail_at_masked_input.get(int(request["round"]), ()):
            raise RuntimeError(f"injected failure of partition {pid} at masked_input, round {request['round']}")
        return inner(msg, context)

    return with_secagg_stage(cfg, stage)


def malformed_client_app(cfg, corrupt: dict[tuple[int, int, str], str]):
    """Our ClientApp, except that partition ``p``'s reply at ``stage`` of round ``r`` is made malformed
    for ``(r, p, stage)`` in ``corrupt``: ``"garbage-ciphertexts"`` (right size, fails authentication:
    only the receivers can tell) or ``"short-masked"`` (one value missing)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    def stage(inner, msg, context):
        request, pid = msg.content["secagg"], int(context.node_config["partition-id"])
        reply = inner(msg, context)
        how = corrupt.get((int(request["round"]), pid, request["stage"]))
        if how == "garbage-ciphertexts":
            fields = dict(reply.content["secagg"])
            reply.content["secagg"] = ConfigRecord({**fields, "ciphertexts": [bytes(len(c))
                                                                              for c in fields["ciphertexts"]]})
        elif how == "short-masked":
            masked = reply.content["secagg-masked"]["masked"].numpy()
            reply.content["secagg-masked"] = ArrayRecord({"masked": Array(masked[:-1].copy())})
        return reply

    return with_secagg_stage(cfg, stage)
