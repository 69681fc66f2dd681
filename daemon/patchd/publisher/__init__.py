"""The publisher's side: keys, packing trees into signed bundles, and the repository.

``pack`` writes a bundle (deterministic, streaming, deltas where they pay), ``publish``
maintains the signed manifest and the bundles of a static repository, ``commands`` is
the argparse glue of ``patchd keygen|pack|publish|root``, ``roots`` creates and signs
versions of the root of trust, ``signer`` signs through a command (``--sign-cmd``) so
keys can stay in an HSM or offline. ``checks`` refuses up front what hosts would refuse
later (names, ``VERSION`` files, keys inside the served directory), ``defaults`` reads
``REPO/patchd-publish.toml``. Only these write what hosts trust.
"""

from patchd.publisher.pack import pack
from patchd.publisher.publish import keygen, publish, roll_back

__all__ = ["keygen", "pack", "publish", "roll_back"]
