"""The branchd benchmark: branchd side by side with plain copying and kernel overlayfs.

``python -m bench`` runs the quick mode, ``python -m bench --full`` the issue's sizes;
bench/README.md says what each row measures.
"""
