"""
The product package holds the product (issue 14): nothing under C{relay/}
imports tool or test code, and the wheel, which is what the image installs,
holds no tool.

The tools (the benchmark, the live fuzzer, the soak, the deploy checker)
live in C{tests/} and C{deploy/}; a product module importing one of them
would drag it back into every install, or break the install that lacks it.
"""

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent

# Where tool and test code lives, and the libraries only tools and tests use.
FORBIDDEN = ("tests", "deploy", "twisted.trial", "hypothesis", "kubernetes_validate")

# Module names (a file's stem or a package's directory) that are tools.
TOOL_NAMES = {"bench", "fuzz", "soak", "lint", "loopback", "tests", "deploy"}

# What the product is, at least: the relay, its client library, the probe
# and the twistd plugin. A wheel without them is broken, not clean.
PRODUCT_FILES = {
    "relay/service.py",
    "relay/relay.py",
    "relay/client.py",
    "relay/quicclient.py",
    "relay/probe.py",
    "twisted/plugins/relay_plugin.py",
}


def moduleName(root, path):
    """
    The dotted name of the module at C{path}, a file under C{root}'s
    parent (C{relay/cluster/__init__.py} is C{relay.cluster}).
    """
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def importedNames(module, path, node):
    """
    The module names the import statement C{node} may load: C{from a
    import b} counts as C{a} and C{a.b} (b may be a module); relative
    imports are resolved against C{module}, found at C{path}.
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if path.name != "__init__.py":
            package.pop()
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return ([base] if base else []) + [
        f"{base}.{alias.name}" if base else alias.name for alias in node.names
    ]


def forbiddenImports(root):
    """
    @param root: a package directory (C{relay/}).
    @return: one line per import statement of tool or test code under
        C{root}, wherever it is (also inside a function):
        C{"relay/x.py:12: relay.x: from tests.bench import wire"}.
    """
    found = []
    for path in sorted(root.rglob("*.py")):
        module = moduleName(root, path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = importedNames(module, path, node)
            if any(name == f or name.startswith(f + ".") for name in names for f in FORBIDDEN):
                found.append(
                    f"{path.relative_to(root.parent)}:{node.lineno}: {module}: {ast.unparse(node)}"
                )
    return sorted(found)


def toolFiles(names):
    """
    The paths among C{names} (a wheel's files) that are tool modules.
    """
    return [name for name in names if TOOL_NAMES & {Path(part).stem for part in Path(name).parts}]


class ImportCheckerTests(unittest.TestCase):
    """
    The checker finds what it must, so that its silence about C{relay/}
    means something.
    """

    def test_findsAbsoluteRelativeAndLateImports(self):
        root = Path(self.mktemp()) / "relay"
        (root / "sub").mkdir(parents=True)
        (root / "__init__.py").write_text("")
        (root / "sub" / "__init__.py").write_text(
            "from . import x\n\n\ndef f():\n    import hypothesis.strategies as st\n"
        )
        (root / "fine.py").write_text(
            "import os\nfrom relay import messages\nfrom . import auth\n"
            "from .cluster import frames\n"
        )
        (root / "tool.py").write_text(
            "import json\n\n\ndef main():\n    from tests.bench import relayproc\n"
        )
        (root / "trial.py").write_text(
            "from twisted.trial import unittest\nimport deploy.lint\nfrom twisted import trial\n"
        )
        self.assertEqual(
            forbiddenImports(root),
            [
                "relay/sub/__init__.py:5: relay.sub: import hypothesis.strategies as st",
                "relay/tool.py:5: relay.tool: from tests.bench import relayproc",
                "relay/trial.py:1: relay.trial: from twisted.trial import unittest",
                "relay/trial.py:2: relay.trial: import deploy.lint",
                "relay/trial.py:3: relay.trial: from twisted import trial",
            ],
        )

    def test_relativeImportsResolve(self):
        tree = ast.parse("from . import a\nfrom .. import b\nfrom ..c import d\n")
        self.assertEqual(
            [
                importedNames("relay.cluster.x", Path("relay/cluster/x.py"), node)
                for node in tree.body
            ],
            [["relay.cluster", "relay.cluster.a"], ["relay", "relay.b"], ["relay.c", "relay.c.d"]],
        )
        self.assertEqual(
            importedNames(
                "relay.cluster",
                Path("relay/cluster/__init__.py"),
                ast.parse("from . import a").body[0],
            ),
            ["relay.cluster", "relay.cluster.a"],
        )

    def test_toolFiles(self):
        self.assertEqual(
            toolFiles(
                [
                    "relay/listener/ws.py",
                    "relay/bench/wire.py",
                    "relay/lint.py",
                    "relay/cluster/frames.py",
                    "relay/soak.py",
                ]
            ),
            ["relay/bench/wire.py", "relay/lint.py", "relay/soak.py"],
        )


class LayoutTests(unittest.TestCase):
    def test_productImportsNoToolOrTestCode(self):
        """
        No module under C{relay/} imports from C{tests/}, C{deploy/} or a
        library only the tools and tests use, even inside a function.
        """
        self.assertEqual(forbiddenImports(ROOT / "relay"), [])

    def test_wheelHoldsNoTool(self):
        """
        The wheel (what C{pip install .} and the image install) holds the
        product and no tool module. Built by the running interpreter's pip,
        as the Dockerfile builds it.
        """
        out = self.mktemp()
        os.makedirs(out)
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                out,
                str(ROOT),
            ],
            capture_output=True,
            timeout=120,
        )
        self.assertEqual(built.returncode, 0, built.stderr.decode(errors="replace")[-2000:])
        wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
        self.assertEqual(len(wheels), 1, wheels)
        with zipfile.ZipFile(os.path.join(out, wheels[0])) as wheel:
            names = wheel.namelist()
        self.assertEqual(PRODUCT_FILES - set(names), set())
        self.assertEqual(toolFiles(names), [])
        self.assertEqual(
            [n for n in names if not n.startswith(("relay/", "twisted/plugins/", "relay-"))], []
        )


def layoutLines(readme):
    """
    The module paths the README's Layout section gives a line of its own
    (C{- `relay/x.py`: what it is}).
    """
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return {
        line[3 : line.index("`:")]
        for line in section.splitlines()
        if line.startswith("- `") and "`:" in line
    }


class ReadmeLayoutTests(unittest.TestCase):
    def test_layoutLines(self):
        """
        L{layoutLines} takes the paths of the section's one-line entries
        and nothing else.
        """
        readme = (
            "# x\n\n## Layout\n\n- `relay/a.py`: A.\n- `relay/b.py` without a colon\n"
            "text `relay/c.py`:\n\n## Next\n\n- `relay/d.py`: D.\n"
        )
        self.assertEqual(layoutLines(readme), {"relay/a.py"})

    def test_everyModuleHasItsLine(self):
        """
        Every module of the product has its line in the README's Layout
        section, and every line there names a module that exists.
        """
        modules = {
            path.relative_to(ROOT).as_posix()
            for top in ("relay", "twisted/plugins")
            for path in (ROOT / top).rglob("*.py")
        }
        listed = layoutLines((ROOT / "README.md").read_text())
        self.assertEqual(
            sorted(modules - listed), [], "modules without a line in README.md's Layout section"
        )
        self.assertEqual(
            sorted(listed - modules), [], "lines in README.md's Layout section naming no module"
        )
