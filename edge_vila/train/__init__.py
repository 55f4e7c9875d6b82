"""The compact training recipe (VILA's stages at laptop scale)."""
