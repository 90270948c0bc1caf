"""The related systems, one file each: related.dsd and related.adaptive_destruction (also scripts)."""
