"""Device certificates: the hub's device CA (``ca``), the certificate request a device makes
with its broker credentials (``service``, ``certs_router``), revocation with the broker's CRL
and a kick of the revoked device's live connection (``revocation``), and the broker's TLS
listener files (``listener``). docs/security-tls.md tells the whole story.
"""
