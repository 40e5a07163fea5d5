"""The Hugging Face remote code an export carries (copied verbatim into the export folder)."""
