"""
Tests for L{deploy.lint}: the deployment checker must pass the shipped files
and name each kind of mistake in one line.
"""

import io
import shutil
from pathlib import Path

from twisted.trial import unittest

from deploy import lint

try:
    import kubernetes_validate  # noqa: F401
except ImportError:
    noSchemas = "kubernetes-validate is not installed"
else:
    noSchemas = None

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# The relay's options as relay.service declares them; the real CLI reads
# them from relay.config.Options.
OPTION_NAMES = [
    "listen-address",
    "exposed-address",
    "auth-secret",
    "tls-cert-file",
    "tls-key-file",
    "letsencrypt-data-dir",
    "letsencrypt-domains",
    "letsencrypt-email",
    "letsencrypt-aws-route53",
    "metrics-port",
    "log-level",
    "log-file",
    "log-format",
    "peer-buffer-limit",
    "cluster-headless",
    "cluster-port",
    "cluster-listen-address",
    "pod-ip",
    "cluster-auth-secret",
    "cluster-discovery-interval",
]
EXTRA_VARIABLES = ["OZ_RELAY_HC_ATTEMPT_THRESHOLD"]
ACCEPTED = lint.acceptedVariables(OPTION_NAMES, EXTRA_VARIABLES)


class VariableTests(unittest.TestCase):
    """
    Option names map to OZ_* variables and unknown ones are reported.
    """

    def test_variableFor(self):
        """
        Dashes become underscores, letters upper case, OZ_ in front.
        """
        self.assertEqual(lint.variableFor("auth-secret"), "OZ_AUTH_SECRET")
        self.assertEqual(lint.variableFor("letsencrypt-aws-route53"), "OZ_LETSENCRYPT_AWS_ROUTE53")

    def test_accepted(self):
        """
        The accepted set holds each option's variable and the extras.
        """
        accepted = lint.acceptedVariables(["log-level", "pod-ip"], ["OZ_X"])
        self.assertEqual(accepted, {"OZ_LOG_LEVEL", "OZ_POD_IP", "OZ_X"})

    def test_unknown(self):
        """
        One line per variable the relay does not read, naming where it is set.
        """
        problems = lint.unknownVariables(
            [("OZ_LOG_LEVEL", "a:1"), ("OZ_LOGLEVEL", "b:2"), ("OZ_NOPE", "c")],
            ACCEPTED,
        )
        self.assertEqual(
            problems,
            [
                "b:2: OZ_LOGLEVEL is not an option of the relay",
                "c: OZ_NOPE is not an option of the relay",
            ],
        )


class DockerfileTests(unittest.TestCase):
    """
    ENV instructions of a Dockerfile are read in all their forms.
    """

    def test_forms(self):
        """
        Continued lines, comments inside them, several variables per ENV, the
        legacy form, lower-case keywords; ARG and non-OZ variables ignored.
        """
        text = "\n".join(
            [
                "FROM python:3.12-slim",
                "# ENV OZ_IN_COMMENT=1",
                "ARG OZ_BUILD_ARG=1",
                "ENV PATH=/opt/bin:$PATH \\",
                "    OZ_LOG_LEVEL=info \\",
                "    # a comment inside the instruction",
                "",
                '    OZ_EXPOSED_ADDRESS="relay example:443"',
                "ENV OZ_LEGACY some value",
                "env OZ_LOWER=1",
                "RUN echo OZ_NOT_ENV=1",
            ]
        )
        self.assertEqual(
            lint.dockerfileVariables(text, "D"),
            [
                ("OZ_LOG_LEVEL", "D:4"),
                ("OZ_EXPOSED_ADDRESS", "D:4"),
                ("OZ_LEGACY", "D:9"),
                ("OZ_LOWER", "D:10"),
            ],
        )

    def test_shippedDockerfile(self):
        """
        The shipped Dockerfile sets only variables the relay reads, and sets
        the ones that an image must default.
        """
        settings = lint.dockerfileVariables((DEPLOY / "Dockerfile").read_text(), "Dockerfile")
        names = {name for name, _ in settings}
        self.assertEqual(lint.unknownVariables(settings, ACCEPTED), [])
        self.assertTrue({"OZ_LISTEN_ADDRESS", "OZ_METRICS_PORT", "OZ_LOG_FILE"} <= names, names)
        self.assertFalse(names & {"OZ_AUTH_SECRET", "OZ_CLUSTER_AUTH_SECRET"})


class ManifestVariableTests(unittest.TestCase):
    """
    OZ_* variables are found in workloads and ConfigMaps.
    """

    def test_workload(self):
        """
        Container and init container env names of a pod template.
        """
        document = {
            "kind": "Deployment",
            "metadata": {"name": "r"},
            "spec": {
                "template": {
                    "spec": {
                        "initContainers": [
                            {"name": "init", "env": [{"name": "OZ_A", "value": "1"}]}
                        ],
                        "containers": [
                            {
                                "name": "relay",
                                "env": [
                                    {"name": "POD_IP"},
                                    {"name": "OZ_B", "value": "2"},
                                ],
                            }
                        ],
                    }
                }
            },
        }
        self.assertEqual(
            lint.manifestVariables(document, "f.yaml"),
            [
                ("OZ_A", "f.yaml: Deployment/r container init"),
                ("OZ_B", "f.yaml: Deployment/r container relay"),
            ],
        )

    def test_configMap(self):
        """
        The OZ_* keys of a ConfigMap, which envFrom turns into variables.
        """
        document = {
            "kind": "ConfigMap",
            "metadata": {"name": "c"},
            "data": {"OZ_LOG_LEVEL": "info", "other": "x"},
        }
        self.assertEqual(
            lint.manifestVariables(document, "c.yaml"),
            [("OZ_LOG_LEVEL", "c.yaml: ConfigMap/c data")],
        )


class KustomizationTests(unittest.TestCase):
    """
    The kustomization and the directory agree.
    """

    def test_problems(self):
        """
        A listed file that is missing and a manifest that is not listed are
        reported; examples need no listing.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "a.yaml").write_text("")
        problems = lint.kustomizationProblems(
            {"resources": ["a.yaml", "gone.yaml"]},
            directory,
            ["a.yaml", "b.yaml", "secret.example.yaml"],
            "k",
        )
        self.assertEqual(
            problems,
            [
                "k: resource gone.yaml does not exist",
                "k: b.yaml is not listed in resources "
                "(name it *.example.yaml if it is only an example)",
            ],
        )


class ShippedManifestTests(unittest.TestCase):
    """
    The shipped deploy/ directory passes, and a broken copy of it fails with
    one line per problem.
    """

    skip = noSchemas

    def copyDeploy(self):
        target = Path(self.mktemp())
        shutil.copytree(DEPLOY, target)
        return target

    def test_shippedPasses(self):
        """
        Every shipped manifest is valid and sets only accepted variables.
        """
        problems, summary = lint.lint(
            DEPLOY / "kubernetes", DEPLOY / "Dockerfile", ACCEPTED, ("1.26", "1.37")
        )
        self.assertEqual(problems, [])
        self.assertIn("valid for Kubernetes 1.26, 1.37", summary)

    def test_brokenCopyFails(self):
        """
        An unknown field, a wrong apiVersion, a misspelt variable and an
        unlisted manifest each give their line.
        """
        target = self.copyDeploy()
        manifests = target / "kubernetes"
        statefulSet = manifests / "statefulset.yaml"
        statefulSet.write_text(
            statefulSet.read_text()
            .replace(
                "      terminationGracePeriodSeconds: 45\n",
                "      terminationGracePeriodSeconds: 45\n      gracePeriod: 45\n",
            )
            .replace("name: OZ_CLUSTER_PORT", "name: OZ_CLUSTER_PROT")
        )
        policy = manifests / "networkpolicy.yaml"
        policy.write_text(
            policy.read_text().replace("networking.k8s.io/v1", "networking.k8s.io/v9")
        )
        (manifests / "extra.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
        )
        problems, _ = lint.lint(manifests, target / "Dockerfile", ACCEPTED, ("1.37",), root=target)
        self.assertEqual(
            problems,
            [
                "kubernetes/kustomization.yaml: extra.yaml is not listed in "
                "resources (name it *.example.yaml if it is only an example)",
                "kubernetes/networkpolicy.yaml: NetworkPolicy/relay: Couldn't "
                "find schema for kind NetworkPolicy with api version "
                "networking.k8s.io/v9 for kubernetes version 1.37",
                "kubernetes/statefulset.yaml: StatefulSet/relay: "
                "spec.template.spec: Additional properties are not allowed "
                "('gracePeriod' was unexpected) (Kubernetes 1.37)",
                "kubernetes/statefulset.yaml: StatefulSet/relay container relay: "
                "OZ_CLUSTER_PROT is not an option of the relay",
            ],
        )

    def test_unknownVersion(self):
        """
        A Kubernetes version without schemas is a problem, not a crash.
        """
        document = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
        self.assertEqual(
            lint.schemaProblems(document, "c.yaml", ("1.2", "9.99")),
            [
                "c.yaml: ConfigMap/c: this kubernetes-validate has no schemas for Kubernetes 1.2",
                "c.yaml: ConfigMap/c: this kubernetes-validate has no schemas for Kubernetes 9.99",
            ],
        )

    def test_notYaml(self):
        """
        A file that is not YAML is one problem, not a crash.
        """
        target = self.copyDeploy()
        (target / "kubernetes" / "configmap.yaml").write_text("a: [\n")
        problems, _ = lint.lint(
            target / "kubernetes",
            target / "Dockerfile",
            ACCEPTED,
            ("1.37",),
            root=target,
        )
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("kubernetes/configmap.yaml: not YAML: "), problems)

    def test_main(self):
        """
        The command line exits 0 with a summary on the shipped files, and 1
        with the problem lines on a broken copy.
        """
        target = self.copyDeploy()
        with (target / "Dockerfile").open("a") as f:
            f.write("ENV OZ_NOT_AN_OPTION=1\n")
        loader = lambda: (OPTION_NAMES, EXTRA_VARIABLES)  # noqa: E731

        def run(directory):
            out, err = io.StringIO(), io.StringIO()
            status = lint.main(
                [
                    "--manifests",
                    str(directory / "kubernetes"),
                    "--dockerfile",
                    str(directory / "Dockerfile"),
                    "--kubernetes-version",
                    "1.30",
                ],
                out,
                err,
                loadOptions=loader,
            )
            return status, out.getvalue(), err.getvalue()

        status, out, err = run(DEPLOY)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.startswith("deploy.lint: ok: "), out)
        status, out, err = run(target)
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1)
        self.assertTrue(err.endswith("OZ_NOT_AN_OPTION is not an option of the relay\n"), err)

    def test_badArgument(self):
        """
        An unknown flag exits 2.
        """
        err = io.StringIO()
        self.assertEqual(lint.main(["--bogus"], io.StringIO(), err), 2)
        self.assertIn("bogus", err.getvalue())


class RelayServiceTests(unittest.TestCase):
    """
    The real option list comes from relay.service.
    """

    def test_optionsFromService(self):
        """
        relayOptionNames reads relay.config.Options, whose variables cover
        what the deployment files set.
        """
        names, extras = lint.relayOptionNames()
        self.assertIn("auth-secret", names)
        self.assertIn("cluster-headless", names)
        import yaml

        accepted = lint.acceptedVariables(names, extras)
        settings = lint.dockerfileVariables((DEPLOY / "Dockerfile").read_text())
        for path in (DEPLOY / "kubernetes").glob("*.yaml"):
            for document in yaml.safe_load_all(path.read_text()):
                settings += lint.manifestVariables(document, path.name)
        self.assertIn("OZ_CLUSTER_HEADLESS", {name for name, _ in settings})
        self.assertEqual(lint.unknownVariables(settings, accepted), [])
