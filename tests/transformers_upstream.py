"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), taken at test time from the source
distribution of the INSTALLED transformers release on the package registry. Nothing of them is kept in this repository.

The source distribution on the registry ships `tests/test_modeling_common.py` and `tests/test_configuration_common.py`
(and a few other common files), but not `tests/generation/`, `tests/exporters/`, `tests/utils/` or `tests/models/`.
`test_modeling_common.py` imports a name from each of the first two, and `test_configuration_common.py` one from the
third, so these imports are given stand-ins here (see `STAND_INS`):

- `generation.test_utils.GenerationTesterMixin`: an empty class. transformers' generation tests are therefore not run;
  the one common test that checks that a generative model's test class has the generation mixin is skipped
  (`test_transformers_mixins.py` says so).
- `exporters.test_export.ExportTesterMixin`: an empty class (the `torch.export` tests are not run).
- `utils.test_configuration_utils.config_common_kwargs`: an empty dict. `ConfigTester` reads it in
  `check_config_arguments_init` only, which returns before that for composite configurations such as Llava's.

A folder that has the complete `tests/` of a transformers checkout (of the installed release) can be named with
`DYNAMIC_LLAVA_TRANSFORMERS_TESTS` instead; the stand-ins are then only used for the files that folder lacks. Not tried
in this project (no such checkout can be had here): with the real `GenerationTesterMixin`, transformers' generation
tests would run on these classes too, and their results have not been triaged.

Where the files come from, in order: `DYNAMIC_LLAVA_TRANSFORMERS_TESTS`; the cache folder
`~/.cache/dynamic-llava-hf/transformers-tests-<version>/tests` (`DYNAMIC_LLAVA_CACHE` replaces
`~/.cache/dynamic-llava-hf`); otherwise `pip download --no-deps --no-binary :all: transformers==<version>` fills the
cache. When that download fails the tests are skipped with pip's message, except under CI (`CI` set), where the
registry is reachable and a failure is an error.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers


PACKAGE = "transformers_upstream_tests"  # the name the upstream `tests/` folder is imported under
NEEDED = ("__init__.py", "test_modeling_common.py", "test_configuration_common.py")


class UpstreamTestsUnavailable(RuntimeError):
    """The upstream test files could not be had (the registry could not be reached)."""


def cache_root() -> Path:
    return Path(os.environ.get("DYNAMIC_LLAVA_CACHE", Path.home() / ".cache" / "dynamic-llava-hf"))


def tests_folder() -> Path:
    """The folder with transformers' `tests/` files for the installed release, downloading them when needed."""
    override = os.environ.get("DYNAMIC_LLAVA_TRANSFORMERS_TESTS")
    if override:
        folder = Path(override)
        missing = [name for name in NEEDED if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"DYNAMIC_LLAVA_TRANSFORMERS_TESTS={override} lacks {missing}")
        return folder
    version = transformers.__version__
    folder = cache_root() / f"transformers-tests-{version}" / "tests"
    if all((folder / name).is_file() for name in NEEDED):
        return folder
    download_tests(version, folder)
    return folder


def download_tests(version: str, folder: Path) -> None:
    """Downloads transformers' source distribution of `version` with pip and unpacks its `tests/` into `folder`."""
    folder.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent.parent) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"transformers=={version}", "--dest", scratch,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or len(archives) != 1:
            message = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise UpstreamTestsUnavailable(
                f"pip could not download the source distribution of transformers {version}: {' / '.join(message)}"
            )
        unpacked = Path(scratch) / "tests"
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.startswith(prefix) and member.name.endswith(".py"):
                    relative = member.name[len(prefix) :]
                    if ".." in Path(relative).parts:
                        continue
                    target = unpacked / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
        # `test_configuration_common` runs `direct_transformers_import` on its own folder, which executes that folder's
        # `__init__.py` (an empty file in transformers' repository, not shipped in the source distribution).
        (unpacked / "__init__.py").touch()
        missing = [name for name in NEEDED if not (unpacked / name).is_file()]
        if missing:
            raise FileNotFoundError(f"the source distribution of transformers {version} has no tests/{missing}")
        # Test workers (pytest-xdist) may download at the same time: the copy arrives whole, by one atomic rename, and
        # a folder already there that is complete came from another process and is kept.
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(unpacked, folder)
        except OSError:
            if all((folder / name).is_file() for name in NEEDED):
                return
            shutil.rmtree(folder)  # incomplete: not one of these copies (files removed by hand, say)
            os.rename(unpacked, folder)


# Names that the shipped common files import from upstream test files the source distribution lacks.
STAND_INS = {
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}


def load_upstream() -> types.SimpleNamespace:
    """Imports transformers' `test_modeling_common` and `test_configuration_common` from `tests_folder()`.

    Returns a namespace with the two modules and `stand_ins`: the dotted names of the modules replaced by stand-ins.
    """
    if PACKAGE not in sys.modules:
        folder = tests_folder()
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
        stand_ins = []
        for dotted, names in STAND_INS.items():
            parent_name, _, leaf = dotted.rpartition(".")
            if (folder / parent_name / f"{leaf}.py").is_file():
                continue  # a complete checkout (DYNAMIC_LLAVA_TRANSFORMERS_TESTS): use the real file
            parent = f"{PACKAGE}.{parent_name}"
            if parent not in sys.modules:
                sub = types.ModuleType(parent)
                sub.__path__ = []
                sys.modules[parent] = sub
            module = types.ModuleType(f"{PACKAGE}.{dotted}")
            module.__dict__.update(names)
            sys.modules[module.__name__] = module
            stand_ins.append(dotted)
        package.stand_ins = stand_ins
    package = sys.modules[PACKAGE]
    return types.SimpleNamespace(
        modeling=importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        configuration=importlib.import_module(f"{PACKAGE}.test_configuration_common"),
        stand_ins=package.stand_ins,
    )
