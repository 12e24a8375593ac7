"""megafs volume format v1: pure functions, no I/O.

Objects on the store (flat namespace, no plaintext names):

=================  ==========================================================
``megafs.header``  JSON: format version, volume id, Argon2id parameters, the
                   wrapped master key (:mod:`megafs.format.header`)
``d/HEX``          one sealed directory object per directory
                   (:mod:`megafs.format.records`)
``i/HEX``          one sealed inode object per hard-linked file
``c/XX/HEX``       immutable content chunks sealed in sub-blocks
                   (:mod:`megafs.format.chunks`)
=================  ==========================================================

Sealing and associated data: :mod:`megafs.format.seal`. This package imports only
the standard library and ``cryptography``.
"""

from megafs.format.header import FORMAT_VERSION as FORMAT_VERSION
from megafs.format.header import HEADER_KEY as HEADER_KEY
