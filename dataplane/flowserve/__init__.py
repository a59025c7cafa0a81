"""FlowServe: the serving engine (`engine.Engine`) and the instance HTTP server (`server`).

`python -m dataplane.flowserve --model PATH --port P` runs one instance.
"""
