"""Trees on disk: a verified bundle becomes a complete tree beside the running one.

``clone`` recreates the base tree cheaply (reflink, hardlink, copy), ``apply`` applies
a bundle's ops through directory fds, ``install`` materialises the tree at its final
place in one rename (promotion is the updater's), ``verify`` re-hashes an installed tree
for strict mode and stamps it (what the file system says, no byte read). Neither
``release_dir`` nor a tree a host may run is ever written.
"""

from patchd.build.clone import CloneMode, clone_tree
from patchd.build.install import InstallRequest, materialise
from patchd.build.verify import TreeStamp, tree_stamp, verify_tree

__all__ = ["CloneMode", "InstallRequest", "TreeStamp", "clone_tree", "materialise", "tree_stamp",
           "verify_tree"]
