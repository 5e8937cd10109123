"""``embedstream bench``: the peer, the raw model and the full pipeline on the same inputs.

Modules: :mod:`.inputs` (seeded varied texts, or the user's file), :mod:`.rows`
(in-process rows: sentence-transformers and raw ONNX Runtime), :mod:`.pipeline`
(broker -> worker process -> Redis), :mod:`.report` (table and JSON) and
:mod:`.command` (the run that ties them together).
"""
