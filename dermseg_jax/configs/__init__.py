"""Training configurations (`ml_collections.ConfigDict` files loaded with `config_flags`).

`default.py` is the embedded default (built-in synthetic data, fixed recipe, CPU-sized);
`thesis.py` reproduces the thesis notebook; `isic2018.py` is a recipe for ISIC 2018 Task 2;
`tiny.py` is the test preset. Variants import `default` and override fields.
"""
