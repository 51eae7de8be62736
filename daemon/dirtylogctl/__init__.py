"""dirtylogctl: the command-line client of dirtylogd and its pre-copy migration driver.

It talks to the daemon only over QMP (qemu.qmp) and never imports the server package; bitmaps
are kvmshim's. The default socket path is computed by :mod:`dirtylogctl.paths`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dirtylogd")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
