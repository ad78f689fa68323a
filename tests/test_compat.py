import numpy as np
import torch

import recbole_llmser  # noqa: F401  (applies compat)
from recbole_llmser.registry import get_model


def test_numpy_aliases_restored():
    assert np.float_ is np.float64 and np.unicode_ is np.str_ and np.complex_ is np.complex128


def test_recbole_model_import_leaves_anomaly_detection_off():
    get_model("SINE")  # its module switches anomaly detection on at import time
    get_model("SASRec")
    assert not torch.is_anomaly_enabled()
