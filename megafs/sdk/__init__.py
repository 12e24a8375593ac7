"""megafs for programs: read and write a volume or a MEGA account without mounting it.

Async first (trio)::

    import megafs.sdk

    async with megafs.sdk.open_drive("/srv/vol", passphrase="...") as drive:
        await drive.mkdir("photos", exist_ok=True)
        async with await drive.open("photos/notes.txt", "wb") as f:
            await f.write(b"hello")
        for entry in await drive.scandir("photos"):
            print(entry.name, entry.stat.st_size)

and synchronous, through :mod:`megafs.sdk.sync` (a trio loop in a background thread)::

    with megafs.sdk.sync.open_drive("/srv/vol", passphrase="...") as drive:
        print(drive.read_bytes("photos/notes.txt"))

A MEGA account opens as ``open_drive("mega://EMAIL", mega_password="...")``.

The drive runs on the same filesystem core as ``megafs mount`` (ARCHITECTURE §3), with
the same durability contract (§6) and the same single-writer lease. Errors: see
:mod:`megafs.sdk._errors` (``FileNotFoundError`` and friends for refused path
operations, the megafs error tree for everything else).
"""

from megafs.sdk._drive import Drive as Drive
from megafs.sdk._drive import Progress as Progress
from megafs.sdk._errors import AlreadyExists as AlreadyExists
from megafs.sdk._errors import IsADirectory as IsADirectory
from megafs.sdk._errors import NotADirectory as NotADirectory
from megafs.sdk._errors import NotFound as NotFound
from megafs.sdk._errors import PathError as PathError
from megafs.sdk._errors import PermissionDenied as PermissionDenied
from megafs.sdk._file import File as File
from megafs.sdk._open import open_drive as open_drive
from megafs.sdk._transfer import Stats as Stats
from megafs.sdk._types import DirEntry as DirEntry
from megafs.sdk._types import PathArg as PathArg
from megafs.sdk._types import StatResult as StatResult
from megafs.sdk._types import StatVfsResult as StatVfsResult
