"""One object store, three clients: our storage layer, delta-rs and PyIceberg's FileIO.

A table's data files are read by our own storage layer (`basis.storage`, pyarrow
filesystems with our retries), but its log or metadata by the table library,
which has its own configuration. This module translates between them, so that
the three talk to the same endpoint with the same credentials:

    our Location (s3://bucket/t?endpoint_override=h:9000&scheme=http)
      -> delta_storage_options  {"AWS_ENDPOINT_URL": "http://h:9000", "AWS_ALLOW_HTTP": "true", ...}
      -> iceberg_properties     {"s3.endpoint": "http://h:9000", ...}
    an Iceberg table's location + its FileIO properties
      -> iceberg_uri            s3://bucket/t?endpoint_override=h:9000&scheme=http, what replicas resolve
      -> iceberg_location       the same, resolved: where the driver reads the table's data files

Only S3 carries options here: for other stores (local paths, `gs://`, ...) the
libraries' own defaults and environment apply, as they do for pyarrow.
Credentials given (in a URI's `KEY_ID:SECRET@`, in the catalog's properties)
are passed on as such, and redacted wherever a URI is shown or stored
(`basis.storage.redact`); without them every client takes the environment's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pyarrow.fs as pafs

from basis.errors import ConfigError
from basis.storage import Location, redact, resolve

# pyarrow S3FileSystem option -> delta-rs (object_store) storage option
_DELTA_KEYS = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
               "session_token": "AWS_SESSION_TOKEN"}
# pyarrow S3FileSystem option -> PyIceberg FileIO property (PyIceberg also reads `client.*` as a fallback)
_ICEBERG_KEYS = {"access_key": "s3.access-key-id", "secret_key": "s3.secret-access-key",
                 "session_token": "s3.session-token"}


def _s3_options(location: Location) -> dict[str, Any] | None:
    """The S3 filesystem's options (pyarrow's own constructor arguments), or None for another store."""
    if not isinstance(location.fs, pafs.S3FileSystem):
        return None
    options = dict(location.fs.__reduce__()[1][0])  # S3FileSystem pickles as its keyword arguments
    options["region"] = location.fs.region or options.get("region") or ""  # resolved by from_uri when not given
    return options


def delta_table_uri(location: Location) -> str:
    """What delta-rs opens: the local path, or the URI without our query options.

    Example:
        >>> delta_table_uri(resolve("s3://bucket/t/?endpoint_override=127.0.0.1:9000&scheme=http"))
        's3://bucket/t'
    """
    return location.path if location.is_local else location.display(location.path)


def delta_storage_options(location: Location) -> dict[str, str]:
    """delta-rs `storage_options` for the store `location` is on ({} where its defaults apply).

    The endpoint, scheme and region given in the URI, and credentials given in it
    (`s3://KEY_ID:SECRET@...`); what is not given comes from the environment
    (`AWS_*`), as for pyarrow.

    Example:
        >>> delta_storage_options(resolve("s3://b/t?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"))
        {'AWS_ENDPOINT_URL': 'http://127.0.0.1:9000', 'AWS_ALLOW_HTTP': 'true', 'AWS_REGION': 'eu-west-1'}
    """
    options = _s3_options(location)
    if options is None:
        return {}
    found: dict[str, str] = {}
    scheme = options.get("scheme") or "https"
    if options.get("endpoint_override"):
        found["AWS_ENDPOINT_URL"] = f"{scheme}://{options['endpoint_override']}"
    if scheme == "http":
        found["AWS_ALLOW_HTTP"] = "true"
    if options.get("region"):
        found["AWS_REGION"] = options["region"]
    if options.get("force_virtual_addressing"):
        found["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "true"
    found.update({key: options[name] for name, key in _DELTA_KEYS.items() if options.get(name)})
    return found


def iceberg_properties(location: Location) -> dict[str, str]:
    """PyIceberg FileIO properties for the store `location` is on ({} where its defaults apply).

    The inverse of `iceberg_location`: a catalog or table given these properties
    reaches the same endpoint, with the same credentials, as `location`.

    Example:
        >>> iceberg_properties(resolve("s3://b/wh?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"))
        {'s3.endpoint': 'http://127.0.0.1:9000', 's3.region': 'eu-west-1'}
    """
    options = _s3_options(location)
    if options is None:
        return {}
    found: dict[str, str] = {}
    if options.get("endpoint_override"):
        found["s3.endpoint"] = f"{options.get('scheme') or 'https'}://{options['endpoint_override']}"
    if options.get("region"):
        found["s3.region"] = options["region"]
    if options.get("force_virtual_addressing"):
        found["s3.force-virtual-addressing"] = "true"
    found.update({key: options[name] for name, key in _ICEBERG_KEYS.items() if options.get(name)})
    return found


def iceberg_uri(table_location: str, properties: Mapping[str, str]) -> str:
    """The URI our storage layer reads an Iceberg table's files with (the driver, and the replicas).

    The table's location with its FileIO's endpoint, scheme and region as options,
    and its key id and secret as `KEY_ID:SECRET@`, as a user writes them in an input
    URI (redacted wherever it is shown or stored). `properties` are the table's FileIO
    properties: the catalog's, merged with what the catalog vends for the table
    (`table.io.properties`). Keys with a session token are left out, since a URI
    cannot carry the token (`iceberg_location` gives it to the driver; replicas take
    theirs from the environment). `s3a://` and `s3n://` (Hadoop's names) are `s3://`
    to pyarrow; other stores keep their location as it is.

    Example:
        >>> iceberg_uri("s3a://b/wh/db/t", {"s3.endpoint": "http://127.0.0.1:9000",
        ...                                 "s3.access-key-id": "K", "s3.secret-access-key": "S/+"})
        's3://K:S%2F%2B@b/wh/db/t?endpoint_override=127.0.0.1:9000&scheme=http'
    """
    scheme, _, rest = table_location.partition("://")
    if scheme.lower() not in ("s3", "s3a", "s3n"):
        return table_location
    query: dict[str, str] = {}
    if endpoint := _setting(properties, "endpoint"):
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parts.netloc:
            raise ConfigError(f"Iceberg property s3.endpoint {redact(endpoint)!r} is not a URL "
                              f"(e.g. http://127.0.0.1:9000)")
        query.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if region := _setting(properties, "region"):
        query["region"] = region
    if _setting(properties, "force-virtual-addressing").lower() == "true":
        query["force_virtual_addressing"] = "true"
    access, secret = _setting(properties, "access-key-id"), _setting(properties, "secret-access-key")
    if bool(access) != bool(secret):
        raise ConfigError(f"the Iceberg table at {redact(table_location)!r} has only one of s3.access-key-id and "
                          f"s3.secret-access-key: set both, or neither (credentials then come from the environment)")
    userinfo = f"{quote(access, safe='')}:{quote(secret, safe='')}@" if access and not _setting(
        properties, "session-token") else ""
    return f"s3://{userinfo}{rest.rstrip('/')}" + (f"?{urlencode(query, safe=':')}" if query else "")


def iceberg_location(table_location: str, properties: Mapping[str, str]) -> Location:
    """Where the driver reads an Iceberg table's files: `iceberg_uri` resolved, with a session token's
    temporary credentials where the properties hold one. Its `uri` is redacted.

    Example:
        >>> where = iceberg_location("s3://b/wh/db/t", {"s3.endpoint": "http://127.0.0.1:9000",
        ...                                             "s3.access-key-id": "K", "s3.secret-access-key": "S"})
        >>> where.uri, where.path, where.fs.__reduce__()[1][0]["secret_key"]
        ('s3://REDACTED:REDACTED@b/wh/db/t?endpoint_override=127.0.0.1:9000&scheme=http', 'b/wh/db/t', 'S')
    """
    location = resolve(iceberg_uri(table_location, properties))
    token = _setting(properties, "session-token")
    options = _s3_options(location)
    if not token or options is None:
        return location
    keys = {"access_key": _setting(properties, "access-key-id"),
            "secret_key": _setting(properties, "secret-access-key"), "session_token": token}
    try:
        fs = pafs.S3FileSystem(**{**options, **keys})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the Iceberg table at {location.uri!r} has S3 settings that pyarrow cannot use: "
                          f"{redact(str(exc))}") from exc
    return Location(fs, location.path, location.uri, location.scheme)


def _setting(properties: Mapping[str, str], name: str) -> str:
    """PyIceberg's `s3.NAME` property, falling back to `client.NAME` as PyIceberg does."""
    return str(properties.get(f"s3.{name}") or properties.get(f"client.{name}") or "")
