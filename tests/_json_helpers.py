"""Walking JSON results in tests."""


def _numbers(x, path=""):
    """(path, value) for every number and every NaN/inf string (JSON has no NaN) in x."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, str) and x.lower() in ("nan", "inf", "-inf"):
        yield path, float(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
