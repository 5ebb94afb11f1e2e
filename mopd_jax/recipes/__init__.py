"""Recipes: short loops composing data -> sample -> score -> loss -> step -> checkpoint."""
