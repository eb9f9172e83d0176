"""The package is one namespace, kvtier.*; the repository folders are never imported bare."""
import ast
import importlib
import pathlib
import pkgutil


ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "kvstore", "connectors", "proto")


def _python_files():
    for folder in (*FOLDERS, "kvtier", "tests", "benchmarks"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_bare_folder_imports():
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert offenders == []


def test_every_module_imports_under_kvtier():
    import kvtier.engine

    seen = []
    for info in pkgutil.walk_packages(kvtier.engine.__path__, prefix="kvtier.engine."):
        mod = importlib.import_module(info.name)
        assert mod.__name__.startswith("kvtier.engine.")
        assert pathlib.Path(mod.__file__).resolve().is_relative_to(ROOT / "engine")
        seen.append(info.name)
    assert "kvtier.engine.scheduler" in seen and "kvtier.engine.models.llama" in seen
    for sub in ("kvstore", "connectors", "proto"):
        mod = importlib.import_module(f"kvtier.{sub}")
        assert pathlib.Path(mod.__file__).resolve().parent == ROOT / sub


def test_public_facade():
    from kvtier import LLM, RequestOutput, SamplingParams

    assert LLM.__module__ == "kvtier.engine.llm"
    assert SamplingParams.__module__ == "kvtier.engine.sampling_params"
    assert RequestOutput.__module__ == "kvtier.engine.outputs"


def _imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_dependencies_point_one_way():
    """engine -> connectors -> kvstore: no layer imports the layers above it."""
    above = {"kvstore": ("kvtier.engine", "kvtier.connectors"), "connectors": ("kvtier.engine",)}
    offenders = []
    for folder, forbidden in above.items():
        for path in (ROOT / folder).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in _imported_modules(path)
                          if m.startswith(forbidden)]
    assert offenders == []


def test_kv_server_uses_no_client_tier_privates():
    server = ROOT / "kvstore" / "service" / "server"
    offenders = [f"{p.name}: {m}" for p in server.rglob("*.py") for m in _imported_modules(p)
                 if m.startswith("kvtier.kvstore.tiers.") and not m.endswith(("lmdb_store", "byte_store"))]
    assert offenders == []


def test_pyproject_lists_every_package():
    """A non-editable install ships only the packages pyproject names: a new folder must be listed."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder in (*FOLDERS, "kvtier"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join(("kvtier",) + (() if folder == "kvtier" else (folder,)) + rel))
    assert found - listed == set()
