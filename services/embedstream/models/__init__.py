"""Model directories: the manifest contract between the exporter and the runtime."""

from embedstream.models.manifest import MANIFEST_FILE, Manifest, find_models, load_manifest

__all__ = ["MANIFEST_FILE", "Manifest", "find_models", "load_manifest"]
