"""internvl_toy: the toy InternVL2.5 model (this is the repository's ``toy/`` folder): generated
scenes and questions (``scenes``), training (``train``, needs torch) and accuracy through the
engine (``evaluate``)."""
