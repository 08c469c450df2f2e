"""Names shared by the builders, the status computation and the handlers."""

from __future__ import annotations

GROUP = "llamaherd.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
CRD_NAME = f"{PLURAL}.{GROUP}"

FIELD_MANAGER = "llamaherd-operator"

# Labels on every object the operator makes, and on the pods.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_INFERENCE_SERVICE = f"{GROUP}/inference-service"

APP_NAME = "llamaherd-server"
MANAGED_BY = FIELD_MANAGER

# Annotations.
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
ANNOTATION_GENERATION = f"{GROUP}/generation"

# The server container and its init container.
SERVER_CONTAINER = "server"
DOWNLOAD_CONTAINER = "model-download"
SERVER_PORT = 8000
PORT_NAME = "http"

ENV_PREFIX = "LLAMAHERD_"
