"""
C{python -m deploy.lint}: offline checks of the deployment files.

Why: a typo in a Kubernetes manifest shows up only when C{kubectl apply}
refuses it, and a misspelt C{OZ_*} variable never shows up at all: the relay
silently runs with the default. This checker catches both before a commit:

  - every manifest under C{deploy/kubernetes} validates, strictly (unknown
    fields are errors), against the Kubernetes schemas that the
    C{kubernetes-validate} package ships, for the oldest and the newest
    Kubernetes version we support;
  - C{kustomization.yaml} lists every manifest there and nothing missing,
    except C{*.example.yaml} files, which are deliberately left out;
  - every C{OZ_*} variable the manifests (container C{env}, ConfigMap and
    Secret keys) and C{deploy/Dockerfile} (C{ENV}) set is one the relay
    reads: C{"OZ_" + name.upper().replace("-", "_")} for each option of
    L{relay.config.Options}, plus the extra variables L{relay.config}
    names in its C{*_VARIABLE} constants.

Each problem is one line on standard error; the exit status is 1 if there is
any.
"""

import shlex
import sys
from pathlib import Path

from twisted.python import usage

ENV_PREFIX = "OZ_"
OLDEST_KUBERNETES = "1.26"
KUSTOMIZATION = "kustomization.yaml"
EXAMPLE_SUFFIX = ".example.yaml"


def variableFor(option):
    """
    The environment variable that sets an option: C{auth-secret} is
    C{OZ_AUTH_SECRET}.
    """
    return ENV_PREFIX + option.upper().replace("-", "_")


def acceptedVariables(optionNames, extraVariables=()):
    """
    @param optionNames: long option names, such as C{"auth-secret"}.
    @param extraVariables: variables read directly, not through an option.
    @return: the set of C{OZ_*} variables the relay reads.
    """
    return {variableFor(name) for name in optionNames} | set(extraVariables)


def relayOptionNames():
    """
    The long option names of L{relay.config.Options} and the extra variables
    L{relay.config} reads, imported only when the real check runs.

    @return: C{(optionNames, extraVariables)}.
    """
    from relay import config

    names = [entry[0] for entry in config.Options.optParameters]
    names += [entry[0] for entry in config.Options.optFlags]
    extras = [
        value
        for attribute, value in vars(config).items()
        if attribute.endswith("_VARIABLE")
        and isinstance(value, str)
        and value.startswith(ENV_PREFIX)
    ]
    return names, extras


def dockerfileVariables(text, source="Dockerfile"):
    """
    The C{OZ_*} variables set by C{ENV} instructions.

    @return: a list of C{(variable, where)}, C{where} naming file and line.
    """
    found = []
    logical, start = "", None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if start is None:
            start = number
        if logical and (not stripped or stripped.startswith("#")):
            # Docker skips comment and empty lines inside a continuation.
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        found.extend(_envInstruction(logical, f"{source}:{start}"))
        logical, start = "", None
    if logical:
        found.extend(_envInstruction(logical, f"{source}:{start}"))
    return [(name, where) for name, where in found if name.startswith(ENV_PREFIX)]


def _envInstruction(instruction, where):
    keyword, _, rest = instruction.partition(" ")
    if keyword.upper() != "ENV":
        return []
    words = shlex.split(rest, posix=True)
    if not words:
        return []
    if "=" not in words[0]:
        # The legacy form, ENV NAME VALUE: one variable per instruction.
        return [(words[0], where)]
    return [(word.partition("=")[0], where) for word in words]


def _podSpecs(document):
    spec = document.get("spec") or {}
    if document.get("kind") == "Pod":
        yield spec
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    if isinstance(template, dict):
        yield template.get("spec") or {}


def manifestVariables(document, source):
    """
    The C{OZ_*} variables one Kubernetes object sets: container C{env} names,
    and the keys of a ConfigMap or Secret (loaded with C{envFrom}).

    @return: a list of C{(variable, where)}.
    """
    if not isinstance(document, dict):
        return []
    name = (document.get("metadata") or {}).get("name", "?")
    kind = document.get("kind", "?")
    found = []
    if kind in ("ConfigMap", "Secret"):
        for field in ("data", "stringData"):
            for key in document.get(field) or {}:
                found.append((key, f"{source}: {kind}/{name} {field}"))
    for podSpec in _podSpecs(document):
        for group in ("initContainers", "containers"):
            for container in podSpec.get(group) or []:
                for entry in container.get("env") or []:
                    found.append(
                        (
                            entry.get("name", ""),
                            f"{source}: {kind}/{name} container {container.get('name', '?')}",
                        )
                    )
    return [(var, where) for var, where in found if var.startswith(ENV_PREFIX)]


def unknownVariables(settings, accepted):
    """
    @param settings: C{(variable, where)} pairs.
    @param accepted: the variables the relay reads.
    @return: one problem line per variable the relay ignores.
    """
    return [
        f"{where}: {variable} is not an option of the relay"
        for variable, where in settings
        if variable not in accepted
    ]


def kubernetesVersions():
    """
    The oldest supported Kubernetes version and the newest one whose schemas
    kubernetes-validate ships.
    """
    from kubernetes_validate import utils

    return (OLDEST_KUBERNETES, utils.major_minor(utils.latest_version()))


def schemaProblems(document, source, versions):
    """
    Validate one object strictly against the schemas of each version.

    @return: problem lines.
    """
    from kubernetes_validate import utils

    if not isinstance(document, dict) or "kind" not in document or "apiVersion" not in document:
        return [f"{source}: not a Kubernetes object (no kind or apiVersion)"]
    name = (document.get("metadata") or {}).get("name", "?")
    what = f"{source}: {document['kind']}/{name}"
    problems = []
    for version in versions:
        try:
            utils.validate(document, version, strict=True)
        except utils.ValidationError as e:
            path = ".".join(str(item) for item in e.path) or "(top)"
            problems.append(f"{what}: {path}: {e.message} (Kubernetes {e.version})")
        except utils.SchemaNotFoundError as e:
            problems.append(f"{what}: {e.message}")
        except (utils.VersionNotSupportedError, IndexError):
            problems.append(
                f"{what}: this kubernetes-validate has no schemas for Kubernetes {version}"
            )
    return problems


def kustomizationProblems(kustomization, directory, manifests, source):
    """
    The kustomization lists every manifest of its directory (examples
    excepted) and only files that exist.

    @param manifests: the file names of the manifests in C{directory}.
    @return: problem lines.
    """
    listed = list(kustomization.get("resources") or [])
    problems = [
        f"{source}: resource {entry} does not exist"
        for entry in listed
        if not (directory / entry).exists()
    ]
    problems += [
        f"{source}: {name} is not listed in resources "
        f"(name it *{EXAMPLE_SUFFIX} if it is only an example)"
        for name in sorted(manifests)
        if name not in listed and not name.endswith(EXAMPLE_SUFFIX)
    ]
    return problems


def lint(manifestDirectory, dockerfile, accepted, versions, root=None):
    """
    Run every check.

    @param manifestDirectory: the L{Path} of the Kubernetes manifests.
    @param dockerfile: the L{Path} of the Dockerfile.
    @param accepted: the C{OZ_*} variables the relay reads.
    @param versions: Kubernetes versions to validate against.
    @param root: paths in messages are relative to it (default: as given).
    @return: C{(problems, summary)}: problem lines and a one-line summary.
    """
    import yaml

    def shown(path):
        if root is not None:
            try:
                return str(path.relative_to(root))
            except ValueError:
                pass
        return str(path)

    problems = []
    settings = []
    objects = 0
    manifests = sorted(
        p
        for p in manifestDirectory.iterdir()
        if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION
    )
    kustomizationPath = manifestDirectory / KUSTOMIZATION
    if kustomizationPath.exists():
        try:
            kustomization = yaml.safe_load(kustomizationPath.read_text()) or {}
        except yaml.YAMLError as e:
            problems.append(f"{shown(kustomizationPath)}: not YAML: {_firstLine(e)}")
        else:
            problems += kustomizationProblems(
                kustomization,
                manifestDirectory,
                [p.name for p in manifests],
                shown(kustomizationPath),
            )
    else:
        problems.append(f"{shown(manifestDirectory)}: no {KUSTOMIZATION}")

    for path in manifests:
        try:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{shown(path)}: not YAML: {_firstLine(e)}")
            continue
        for document in documents:
            objects += 1
            problems += schemaProblems(document, shown(path), versions)
            settings += manifestVariables(document, shown(path))

    if dockerfile.exists():
        settings += dockerfileVariables(dockerfile.read_text(), shown(dockerfile))
    else:
        problems.append(f"{shown(dockerfile)}: does not exist")

    problems += unknownVariables(settings, accepted)
    summary = (
        f"{objects} Kubernetes objects in {len(manifests)} files valid for "
        f"Kubernetes {', '.join(versions)}; {len({v for v, _ in settings})} "
        f"OZ_* variables, all read by the relay"
    )
    return problems, summary


def _firstLine(error):
    return str(error).splitlines()[0]


class LintOptions(usage.Options):
    synopsis = "[options]"
    longdesc = "Check the Kubernetes manifests and the Dockerfile offline."

    optParameters = [
        ["manifests", "m", "deploy/kubernetes", "Directory of the Kubernetes manifests."],
        ["dockerfile", "d", "deploy/Dockerfile", "The image's Dockerfile."],
    ]

    def __init__(self):
        super().__init__()
        self["kubernetes-version"] = []

    def opt_kubernetes_version(self, version):
        """
        Validate against this Kubernetes version (repeatable; default: the
        oldest supported and the newest known).
        """
        self["kubernetes-version"].append(version)


def main(argv=None, stdout=None, stderr=None, loadOptions=relayOptionNames):
    """
    The command line.

    @param loadOptions: returns C{(optionNames, extraVariables)} of the relay.
    @return: the exit status.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    options = LintOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        stderr.write(f"deploy.lint: {e}\n")
        return 2
    try:
        versions = tuple(options["kubernetes-version"]) or kubernetesVersions()
    except ImportError:
        stderr.write("deploy.lint: the kubernetes-validate package is not installed\n")
        return 2
    names, extras = loadOptions()
    problems, summary = lint(
        Path(options["manifests"]),
        Path(options["dockerfile"]),
        acceptedVariables(names, extras),
        versions,
        root=Path.cwd(),
    )
    for problem in problems:
        stderr.write(problem + "\n")
    if problems:
        return 1
    stdout.write(f"deploy.lint: ok: {summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
