"""The BLIP Lab dashboard (Streamlit): `streamlit run dashboard/app.py [-- --runs-dir DIR]`.

A package, so that app.py, the pages in views/ (page scripts, not a package) and the tests all import
its modules the same way, `from dashboard import common, figures`, with the project installed
(`pip install -e .`, which `make install` does) and no edits of sys.path.
"""
