"""The registry routes by role: each instance belongs to one group of its deployment, callers ask
for a role or for any, and a waiting request counts toward the group that it waits on."""

from __future__ import annotations

import asyncio

from controlplane.registry import ReadyInstance, Registry


def pd_instances() -> list[ReadyInstance]:
    return [
        ReadyInstance("p1", "d", None, "http://p1", role="prefill"),
        ReadyInstance("p2", "d", None, "http://p2", role="prefill", accepting=False),
        ReadyInstance("d1", "d", None, "http://d1", role="decode"),
        ReadyInstance("c1", "other", None, "http://c1"),
    ]


def test_candidates_and_acquire_by_role() -> None:
    async def scenario() -> None:
        registry = Registry()
        await registry.set_deployments({"d": "m", "other": "m"}, {"d": "disaggregated"})
        await registry.set_ready(pd_instances())
        assert [c.id for c in registry.candidates("d", "prefill")] == ["p1"]
        assert [c.id for c in registry.candidates("d", "decode")] == ["d1"]
        assert sorted(c.id for c in registry.candidates("d")) == ["d1", "p1"]  # any role
        assert registry.candidates("d", "colocated") == []
        assert registry.ready_roles("d") == {"prefill", "decode"}
        assert registry.ready_roles("other") == {"colocated"}
        assert registry.mode_of("d") == "disaggregated" and registry.mode_of("other") == "colocated"

        chosen = await registry.acquire("d", timeout=1.0, role="decode")
        assert chosen is not None and chosen.id == "d1"
        assert registry.load_of("d", "decode") == (1, 1, 0)
        assert registry.load_of("d", "prefill") == (1, 0, 0)  # p2 drains: not counted
        assert registry.load_of("d") == (2, 1, 0)
        assert await registry.acquire("d", timeout=0.05, role="colocated") is None

    asyncio.run(scenario())


def test_waiting_requests_count_toward_the_group_they_wait_on() -> None:
    async def scenario() -> None:
        registry = Registry()
        woken: list[str] = []
        registry.on_waiting = woken.append
        await registry.set_deployments(
            {"pd": "m", "mixed": "m"}, {"pd": "disaggregated", "mixed": "auto"}
        )
        waiters = [
            asyncio.create_task(registry.acquire("pd", 5.0, role="decode")),
            asyncio.create_task(registry.acquire("pd", 5.0)),  # any role
            asyncio.create_task(registry.acquire("mixed", 5.0)),  # any role
            asyncio.create_task(registry.acquire("mixed", 5.0, role="prefill")),
        ]
        await asyncio.sleep(0.05)
        assert woken == ["pd", "pd", "mixed", "mixed"]
        # A request for any role waits on every group of a disaggregated deployment ...
        assert registry.load_of("pd", "decode") == (0, 0, 2)
        assert registry.load_of("pd", "prefill") == (0, 0, 1)
        # ... and on the colocated group of a deployment that has one.
        assert registry.load_of("mixed", "colocated") == (0, 0, 1)
        assert registry.load_of("mixed", "prefill") == (0, 0, 1)
        assert registry.load_of("mixed", "decode") == (0, 0, 0)
        assert registry.load_of("mixed") == (0, 0, 2)

        await registry.set_ready([ReadyInstance("d1", "pd", None, "http://d1", role="decode")])
        decode, anyone = await asyncio.gather(waiters[0], waiters[1])
        assert decode is not None and anyone is not None and decode.id == anyone.id == "d1"
        assert registry.load_of("pd", "prefill") == (0, 0, 0)
        for waiter in waiters[2:]:
            waiter.cancel()
        await asyncio.gather(*waiters[2:], return_exceptions=True)
        assert registry.load_of("mixed") == (0, 0, 0)

    asyncio.run(scenario())


def test_claim_takes_every_instance_or_none() -> None:
    async def scenario() -> None:
        registry = Registry()
        await registry.set_deployments({"d": "m"}, {"d": "disaggregated"})
        await registry.set_ready(pd_instances())
        assert registry.claim(["p1", "d1"])
        assert registry.load_of("d", "prefill")[1] == 1 and registry.load_of("d", "decode")[1] == 1
        assert not registry.claim(["p2", "d1"])  # p2 drains: d1 is not counted either
        assert not registry.claim(["p1", "gone"])
        assert registry.load_of("d") == (2, 2, 0)

    asyncio.run(scenario())


def test_wait_for_change_is_counted_as_waiting_until_the_ready_set_changes() -> None:
    async def scenario() -> None:
        registry = Registry()
        woken: list[str] = []
        registry.on_waiting = woken.append
        await registry.set_deployments({"d": "m"}, {"d": "disaggregated"})
        waiter = asyncio.create_task(registry.wait_for_change("d", 5.0))
        await asyncio.sleep(0.05)
        assert woken == ["d"]
        assert registry.load_of("d", "prefill") == (0, 0, 1)
        await registry.set_ready([ReadyInstance("p1", "d", None, "http://p1", role="prefill")])
        assert await waiter
        assert registry.load_of("d") == (1, 0, 0)
        assert not await registry.wait_for_change("d", 0.05)
        assert not await registry.wait_for_change("unknown", 5.0)

    asyncio.run(scenario())


def test_a_semi_pd_deployment_waits_and_routes_as_colocated() -> None:
    async def scenario() -> None:
        registry = Registry()
        await registry.set_deployments({"s": "m"}, {"s": "semi-pd"})
        waiter = asyncio.create_task(registry.acquire("s", timeout=5.0))
        await asyncio.sleep(0.01)
        assert registry.load_of("s", "colocated") == (0, 0, 1)  # counts toward its one group
        await registry.set_ready([ReadyInstance("s1", "s", None, "http://s1", semi_pd=True)])
        chosen = await waiter
        assert chosen is not None and chosen.id == "s1"
        assert registry.runs_semi_pd("s1") and not registry.runs_semi_pd("gone")
        assert registry.ready_roles("s") == {"colocated"}

    asyncio.run(scenario())
