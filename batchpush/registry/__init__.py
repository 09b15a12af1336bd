"""Talking to OCI distribution registries."""

from .auth import CredentialProvider, Credentials, no_credentials
from .client import RegistryClient, RegistryOptions, UploadSession
from .errors import AuthError, ManifestDigestError, RegistryError

__all__ = ["AuthError", "CredentialProvider", "Credentials", "ManifestDigestError", "RegistryClient", "RegistryError", "RegistryOptions", "UploadSession", "no_credentials"]
