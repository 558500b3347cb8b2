# PyInstaller's own gevent hook, with its submodule filter fixed: it means
# to leave gevent's test suite out but keeps it (`or` for `and`), and then
# warns about every test module it excludes. Same collection otherwise:
# every gevent submodule and C extension, no .py sources, its metadata.
from PyInstaller.utils.hooks import collect_all, copy_metadata

TESTS = ('gevent.testing', 'gevent.tests')
excludedimports = list(TESTS)

datas, binaries, hiddenimports = collect_all(
    'gevent',
    filter_submodules=lambda name: not name.startswith(TESTS),
    include_py_files=False,
    exclude_datas=['**/tests'],
)
datas += copy_metadata('gevent', recursive=True)
