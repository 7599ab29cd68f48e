"""Where `persres ui` may serve, checked before anything is loaded: a port that exists and is free,
a host that resolves, and --auth wherever the page would be reachable beyond this machine.
(Imports no Gradio: a bad option is one line at once.)"""

from __future__ import annotations

import errno
import ipaddress
import socket

from persres.errors import InputError


def resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo's answers for a TCP server on (host, port); InputError naming the host if there are none."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise InputError(f"--host {host!r} cannot be resolved to an address of this machine ({reason})") from None


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError, UnicodeError):
        return False


def check_exposure(host: str, auth: str | None) -> tuple[str, str] | None:
    """Loopback needs nothing; any other address needs --auth USER:PASS (the share tunnel is never opened)."""
    credentials = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise InputError("--auth must be USER:PASS")
        credentials = (user, password)
    if not is_loopback(host) and credentials is None:
        raise InputError(f"--host {host} would serve the app beyond this machine: add --auth USER:PASS (or keep the default 127.0.0.1)")
    return credentials


def check_serving(host: str, port: int, auth: str | None) -> tuple[str, str] | None:
    """The credentials to serve with, after checking the port (1-65535, free on `host`), the host (it
    resolves) and the exposure (`check_exposure`), in that order; InputError naming the option."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InputError(f"--port must be a whole number from 1 to 65535, got {port!r}")
    family, kind, proto, _, address = resolve(host, port)[0]
    credentials = check_exposure(host, auth)
    probe = socket.socket(family, kind, proto)
    try:
        probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"--port {port} is already in use on {host}: choose another with --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"--host {host!r} is not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise InputError(f"--port {port} needs privileges on this machine: choose one above 1023") from None
        raise InputError(f"cannot serve on {host}:{port} ({e.strerror or e})") from None
    finally:
        probe.close()
    return credentials
