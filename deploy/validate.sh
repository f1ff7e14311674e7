#!/usr/bin/env bash
# Offline checks of the deployment files (no container daemon, no cluster):
#   1. deploy/k8s/*.yaml against the Kubernetes OpenAPI schemas shipped in the
#      kubernetes-validate package (strict: unknown fields are errors), for the
#      oldest version the manifests need (1.28: the pod-index label) and the
#      newest the package knows;
#   2. deploy/compose.yaml against the Compose Specification schema shipped in
#      check-jsonschema (--builtin-schema vendor.compose-spec);
#   3. consistency checks no schema makes (deploy/validate.py): the Dockerfile
#      (its cargo commands are the README's, stages, non-root user, health
#      check, ports, .dockerignore keeps what the build needs), the compose
#      cluster (ports, peers, node ids) and the manifests (discovery Service,
#      Secret keys, probes, grace period).
# Both tools come from PyPI at pinned versions, into a venv cached under
# ~/.cache; after that install nothing here touches the network.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECK_JSONSCHEMA_VERSION=0.39.0
K8S_VERSIONS=(1.28.0 1.37.0)

venv="${SWITCHBOARD_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/switchboard-validate/kv${KUBERNETES_VALIDATE_VERSION}-cj${CHECK_JSONSCHEMA_VERSION}}"
if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1 \
  || ! "$venv/bin/check-jsonschema" --version >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
fi

manifests=(deploy/k8s/*.yaml)
for v in "${K8S_VERSIONS[@]}"; do
  echo "-- kubernetes-validate --strict -k $v deploy/k8s/*.yaml"
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${manifests[@]}"
done

echo "-- check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "-- deploy/validate.py (Dockerfile, compose and manifest consistency)"
"$venv/bin/python" deploy/validate.py

echo "deploy: all checks passed"
