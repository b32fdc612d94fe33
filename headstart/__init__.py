"""The headstart library: everything the stages in `tasks/` share (see docs/architecture.md).

Package `__init__` files hold only a docstring, so importing a module never runs code from another
and dvc.yaml's code deps can list modules, not packages (tests/test_dvc_deps.py checks both).
"""
