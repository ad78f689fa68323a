"""Former home of CCG, kept only as an import path: CCG is ``ccg.py``, the helper models are
:mod:`recbole_llmser.helper_models`, user sequences and training prefixes :mod:`recbole_llmser.sequences`.

``tests/test_dct.py`` still imports :func:`training_prefixes` from here; delete this module once it does not.
"""

from recbole_llmser.sequences import training_prefixes  # noqa: F401
