"""semi-PD in one FlowServe instance: a prefill worker and a decode worker, each a thread on its
own compute partition, over one copy of the weights and one KV pool, with the SLO-aware dynamic
partitioning of the semi-PD paper (docs/flowserve.md, "semi-PD"). Build it with
`dataplane.flowserve.engine.open_engine(EngineConfig(semi_pd=True, ...))`."""
