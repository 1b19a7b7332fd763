"""The package's shape: leaf modules import nothing of the project's, nothing but the
trainer's own entry points imports ``train``, and what needs no megatron-core imports
without it."""

import ast
import os
import subprocess
import sys

from paths import ROOT

PACKAGE = os.path.join(ROOT, "milora_megatron")
LEAVES = {"mapping", "data", "device", "subspace", "errors", "hub", "schema"}
# what every part may import, leaves too: the user-error family, the Hub (a model's or a
# dataset's) and the config schema's helpers
ROOTS = {"errors", "hub", "schema"}


def _imports(path: str) -> set[str]:
    """The project's first-level parts (``mapping``, ``train``, ...) a module imports."""
    module = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    package = module.split(".")[:-1]  # a module's package (an __init__'s is its own folder)
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "milora_megatron" and len(parts) > 1:
                found.add(parts[1])
    return found


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                yield os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py"), path


def test_dependencies_point_one_way():
    for part, path in _modules():
        imported = _imports(path) - {part} - ROOTS
        if part in LEAVES:
            assert not imported, f"{path} is a leaf but imports {imported}"
        if part not in ("train",):
            assert "train" not in imported, f"{path} imports train"
        if part == "checkpoint":
            assert "convert" not in imported, f"{path}: checkpoint must not import convert"


def test_the_package_imports_without_megatron():
    """Everything but the megatron-bound modules (adapters.apply/.layer, train.loop and its
    parts, models.layers) imports with megatron-core unavailable."""
    modules = ["milora_megatron.adapters", "milora_megatron.adapters.variants", "milora_megatron.mapping",
               "milora_megatron.data", "milora_megatron.analysis", "milora_megatron.analysis.deltas",
               "milora_megatron.convert.importer", "milora_megatron.convert.exporter", "milora_megatron.checkpoint.base",
               "milora_megatron.checkpoint.adapters", "milora_megatron.models.decoder", "milora_megatron.subspace",
               "milora_megatron.device", "milora_megatron.train.config", "milora_megatron.errors"]
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'megatron' or name.startswith('megatron.'):\n"
            "            raise ImportError('megatron-core is blocked in this test')\n"
            "sys.meta_path.insert(0, Block())\n"
            + "".join(f"import {m}\n" for m in modules) + "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_test_files_have_unique_names():
    """pytest imports test files by basename (no packages under tests/): two of a name break
    the collection of the whole suite."""
    names = [f for _, _, files in os.walk(os.path.join(ROOT, "tests")) for f in files
             if f.startswith("test_") and f.endswith(".py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_module_has_its_tests_named_and_they_exist():
    """tests/support/module_tests.py: which tests exercise each module. A new module is
    refused until its tests are named; a test file renamed or deleted, until the entry is."""
    from module_tests import MODULE_TESTS

    modules = sorted(os.path.relpath(path, PACKAGE) for _, path in _modules())
    assert sorted(MODULE_TESTS) == modules, (set(modules) ^ set(MODULE_TESTS))
    missing = [(m, t) for m, tests in MODULE_TESTS.items() for t in tests
               if not os.path.isfile(os.path.join(ROOT, "tests", t))]
    assert not missing and all(MODULE_TESTS.values()), missing
