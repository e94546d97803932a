"""Writing files so that a reader never sees half of one: write a temporary file beside the target, flush
and fsync it, rename it over the target, fsync the folder.  Every file the project writes for later
(configs, manifests, checkpoint markers, exports, search results) goes through here."""

from fileops.atomic import atomic_output, atomic_write_bytes, atomic_write_text, fsync_dir, temp_path_for

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "temp_path_for"]
