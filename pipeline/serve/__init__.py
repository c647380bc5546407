"""The endpoint: Workers AI's API for the model over the batch job's own request path (prepare,
engine requests, answers), on vLLM's async engine, under uvicorn or as Ray Serve replicas, with a
playground page. docs/serve.md.

Empty on purpose: importing a pure module of this package must not import vLLM or Ray.
"""
