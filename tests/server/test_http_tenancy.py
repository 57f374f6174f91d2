"""The HTTP side port (health, readiness, metrics, tenant-scoped admin, OpenAPI) and tenant
isolation over gRPC and HTTP, against an in-process sidecar on loopback ports."""

from __future__ import annotations

import grpc
import pytest
from nexus_client.packing import unpack_result

from tests.server.conftest import (
    KEYS,
    SMALL,
    SimSession,
    arun,
    client,
    drive,
    expect_error,
    http,
    metric_samples,
    running_sidecar,
    sample_value,
)

pytestmark = pytest.mark.timeout(90)

# Every label the sidecar may put on a metric: bounded sets, never a session id.
ALLOWED_LABELS = {"tenant", "policy", "rpc", "code", "op", "outcome", "device", "le", "kind", "phase", "writer", "task"}


def test_health_ready_metrics_admin_openapi() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sims = [SimSession("h1", seed=1), SimSession("h2", seed=2, config={**SMALL, "policy": "tova"})]
            for s in sims:
                await c.open_session(s.session_id, s.config)
            history = await drive(c, sims, 8)
            seen = {s.session_id: s.next_pos for s in sims}
            evicted = {s.session_id: 0 for s in sims}
            for results in history:
                for r in results:
                    evicted[r.session_id] += sum(e.numel() for e in unpack_result(r)[1])
            assert all(evicted.values()), evicted

            async with http(sc) as h:
                r = await h.get("/healthz")
                assert r.status_code == 200 and r.json() == {"status": "ok"}
                r = await h.get("/readyz")
                assert r.status_code == 200, r.text
                assert r.json()["ready"] is True and r.json()["store"] == "ok" and r.json()["draining"] is False

                r = await h.get("/metrics")
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
                names = {n for n, _, _ in metric_samples(r.text)}
                for needed in ("nexus_request_duration_seconds_bucket", "nexus_request_duration_seconds_count",
                               "nexus_tokens_evicted_total", "nexus_tokens_seen_total",
                               "nexus_queue_wait_seconds_count",
                               "nexus_engine_compute_seconds_count", "nexus_batch_sessions_count",
                               "nexus_sessions_open", "nexus_step_retention_ratio_count", "nexus_tokens_retained",
                               "nexus_retained_attention_mass_count", "nexus_evicted_token_age_calls_count",
                               "nexus_store_operation_seconds_count", "nexus_degraded"):
                    assert needed in names, f"{needed} missing from /metrics"
                for s in sims:
                    policy = s.cfg.policy
                    assert sample_value(r.text, "nexus_tokens_seen_total", tenant="default", policy=policy) == \
                        seen[s.session_id]
                    assert sample_value(r.text, "nexus_tokens_evicted_total", tenant="default", policy=policy) == \
                        evicted[s.session_id]
                    assert sample_value(r.text, "nexus_tokens_retained", tenant="default", policy=policy) == \
                        sum(p.numel() for p in s.retained)
                assert sample_value(r.text, "nexus_request_duration_seconds_count", rpc="Step", code="OK") == 8
                assert sample_value(r.text, "nexus_sessions_open", tenant="default") == 2
                assert sample_value(r.text, "nexus_batch_sessions_count") >= 8

                r = await h.get("/v1/sessions")
                assert r.status_code == 200 and r.json() == {"tenant": "default", "sessions": ["h1", "h2"]}
                r = await h.get("/v1/sessions/h1")
                assert r.status_code == 200, r.text
                view = r.json()
                assert view["step"] == 8 and view["policy"] == "nexus" and view["tenant"] == "default"
                assert view["config"]["budget"] == SMALL["budget"]
                assert view["groups"][0]["positions"] == sims[0].retained[0].tolist()
                assert view["retained"] == sims[0].retained[0].numel() == view["groups"][0]["retained"]
                assert view["tokens_seen"] == seen["h1"]
                assert view["tokens_evicted"] == evicted["h1"]
                assert view["groups"][0]["weight_min"] <= view["groups"][0]["weight_max"]

                r = await h.get("/v1/sessions/nope")
                assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND"
                r = await h.get("/v1/sessions/bad%20id")
                assert r.status_code == 400 and "session_id" in r.json()["message"]

                r = await h.delete("/v1/sessions/h1")
                assert r.status_code == 200 and r.json() == {"session_id": "h1", "step": 8}
                assert (await h.get("/v1/sessions/h1")).status_code == 404
                assert (await h.delete("/v1/sessions/h1")).status_code == 404
                assert (await h.get("/v1/sessions")).json()["sessions"] == ["h2"]
                await expect_error(c.get_session("h1"), grpc.StatusCode.NOT_FOUND)
                r = await h.get("/metrics")
                assert sample_value(r.text, "nexus_sessions_open", tenant="default") == 1
                assert sample_value(r.text, "nexus_sessions_closed_total", tenant="default") == 1
                assert sample_value(r.text, "nexus_tokens_retained", tenant="default", policy="nexus") == 0

                spec = (await h.get("/openapi.json")).json()
                for path in ("/healthz", "/readyz", "/metrics", "/v1/sessions", "/v1/sessions/{session_id}"):
                    assert path in spec["paths"], f"{path} missing from the OpenAPI spec"
                assert "delete" in spec["paths"]["/v1/sessions/{session_id}"]
            await c.close()

    arun(body())


def test_readyz_503_when_redis_is_down(redis_factory) -> None:
    rp = redis_factory()

    async def body() -> None:
        async with running_sidecar(store=rp.url, store_timeout_s=0.5, checkpoint_every=1) as sc:
            c = client(sc)
            sim = SimSession("r1")
            await c.open_session("r1", sim.config)
            await drive(c, [sim], 1)
            async with http(sc) as h:
                assert (await h.get("/readyz")).status_code == 200
                rp.stop()
                r = await h.get("/readyz")
                assert r.status_code == 503, r.text
                assert r.json()["ready"] is False and r.json()["store"].startswith("unavailable"), r.json()
                assert (await h.get("/healthz")).status_code == 200, "liveness does not depend on the store"
                # Steps are still served from hot state; the failed checkpoint flags degraded mode.
                await drive(c, [sim], 1)
                for _ in range(100):
                    text = (await h.get("/metrics")).text
                    if sample_value(text, "nexus_degraded") == 1:
                        break
                else:
                    raise AssertionError("nexus_degraded did not become 1 after a failed store operation")
                # The first failed store op flags it: the step's owner-epoch read, or the checkpoint.
                assert sample_value(text, "nexus_store_errors_total", op="epochs") + \
                    sample_value(text, "nexus_store_errors_total", op="put") >= 1
            await c.close()

    arun(body())


def test_tenants_do_not_see_each_other(keys_file) -> None:
    private = "acme-private-zz9"

    async def body() -> None:
        async with running_sidecar(keys_file=keys_file) as sc:
            acme, globex = client(sc, KEYS["acme"]), client(sc, KEYS["globex"])
            a = SimSession("shared", seed=1)
            g = SimSession("shared", seed=2, config={**SMALL, "budget": 30})
            p = SimSession(private, seed=3)
            await acme.open_session("shared", a.config)
            # The same id under another tenant is another session (its own config, no conflict).
            assert (await globex.open_session("shared", g.config)).step == 0
            await acme.open_session(private, p.config)
            await drive(acme, [a, p], 3)
            await drive(globex, [g], 1)
            assert (await acme.get_session("shared")).step == 3
            assert (await globex.get_session("shared")).step == 1
            assert (await globex.get_session("shared")).config.budget == 30
            NF = grpc.StatusCode.NOT_FOUND
            await expect_error(globex.get_session(private), NF)
            await expect_error(globex.step([SimSession(private).make().msg]), NF)
            await expect_error(globex.close_session(private), NF)

            async with http(sc, KEYS["acme"]) as ha, http(sc, KEYS["globex"]) as hg, \
                    http(sc, KEYS["acme-ro"]) as hro, http(sc) as anon, http(sc, "unknown-key-00000000000") as bad:
                assert (await ha.get("/v1/sessions")).json() == {"tenant": "acme", "sessions": [private, "shared"]}
                assert (await hg.get("/v1/sessions")).json() == {"tenant": "globex", "sessions": ["shared"]}
                assert (await hro.get("/v1/sessions")).json()["tenant"] == "acme"
                assert (await hg.get(f"/v1/sessions/{private}")).status_code == 404
                assert (await hg.get("/v1/sessions/shared")).json()["step"] == 1
                assert (await ha.get("/v1/sessions/shared")).json()["step"] == 3
                r = await anon.get("/v1/sessions")
                assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED"
                assert (await bad.get("/v1/sessions")).status_code == 401
                assert (await anon.get("/healthz")).status_code == 200  # probes need no key
                assert (await hro.delete("/v1/sessions/shared")).status_code == 403
                assert (await hg.delete(f"/v1/sessions/{private}")).status_code == 404

                text = (await anon.get("/metrics")).text
                assert sample_value(text, "nexus_tokens_seen_total", tenant="acme") == a.next_pos + p.next_pos
                assert sample_value(text, "nexus_tokens_seen_total", tenant="globex") == g.next_pos
                assert sample_value(text, "nexus_sessions_open", tenant="acme") == 2
                assert sample_value(text, "nexus_sessions_open", tenant="globex") == 1
                for name, labels, _ in metric_samples(text):
                    assert set(labels) <= ALLOWED_LABELS, f"{name} has unexpected labels {sorted(labels)}"
                    assert private not in labels.values() and "shared" not in labels.values(), (name, labels)

                # Closing globex's "shared" leaves acme's untouched.
                assert (await hg.delete("/v1/sessions/shared")).status_code == 200
                assert (await acme.get_session("shared")).step == 3
                assert (await ha.get("/v1/sessions")).json()["sessions"] == [private, "shared"]
            await acme.close()
            await globex.close()

    arun(body())
