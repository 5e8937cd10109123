"""Raw inputs to graph inputs, one module per modality.

- :mod:`.base`: the interface (``prepare`` / ``pack``), :class:`~.base.Limits`, and the
  registry :data:`~.base.PREPROCESSORS` the implementations add themselves to
- :mod:`.text` (tokenizer.json, with :mod:`.chunking` for long documents),
  :mod:`.wordvec` (vocabulary lookup, fastText n-grams), :mod:`.image` (Pillow decode,
  resize, crop, normalise), :mod:`.audio` (soundfile decode, resample, log-mel)
- :mod:`.modalities`: the one place that imports them all, and picks one by a model's
  manifest (``build_preprocessor``)

The model backends that run the prepared batches are :mod:`embedstream.runtime`.
This package's ``__init__`` imports nothing, so no module here imports its
implementations back.
"""
