"""GGUF (llama.cpp) interop: block codecs, export and import of llama models.

    from lowbit.io.gguf import export_gguf, import_gguf
    report = export_gguf(model, "model.Q4_K_M.gguf", "Q4_K_M", source_gguf=default_model_path())
    model = import_gguf("model.Q4_K_M.gguf", as_is=True)

Modules: ``blocks`` (one encoder/decoder per GGML block type), ``mix`` (llama.cpp's
per-tensor type rule), ``names`` (GGUF <-> HF names, q/k row permutation),
``writer`` (``export_gguf``), ``reader`` (``import_gguf``, ``read_gguf``), ``validate``
(the file's structure, checked before gguf-py parses it; tensor values), ``hparams``
(llama metadata: types, ranges, consistency with the tensors).
"""

from lowbit.io.gguf.reader import import_gguf, read_gguf
from lowbit.io.gguf.writer import ExportReport, export_gguf

__all__ = ["ExportReport", "export_gguf", "import_gguf", "read_gguf"]
