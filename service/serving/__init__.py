"""The engine: loaded models and the path of one inference request through them.

- `registry`: the model versions served, loading and unloading, which version a request goes
  to, and which requests are admitted while the server shuts down.
- `model`: one served model version: it checks a request, plans its work and answers it once.
- `execution`: one batch run: state gather, state store sync, model call, scatter.
- `request`: the frozen request and outcome values that go down and come back up.
- `snapshot`, `statistics`: the figures it publishes, which metrics and ModelStatistics read.

Transport-neutral: it takes arrays and answers with an InferenceResult or a ServiceError. It
composes the repository, the runtime, the batcher (scheduling) and the sessions (live
sequences, the state arena, state stores).
"""
