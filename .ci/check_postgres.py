"""Fail when the PostgreSQL tests, or the LAN tests (network namespaces,
a private PostgreSQL), of a JUnit report skipped or never ran."""
import sys
import xml.etree.ElementTree as ET

cases = list(ET.parse(sys.argv[1]).iter('testcase'))
for kind, chosen in (
        ('PostgreSQL', [c for c in cases if 'postgres' in c.get('name', '')]),
        ('LAN', [c for c in cases if 'test_lan' in c.get('classname', '')])):
    skipped = [c.get('name') for c in chosen if c.find('skipped') is not None]
    if not chosen or skipped:
        print(f'{kind} tests: {len(chosen)} found, skipped: {skipped}')
        sys.exit(1)
    print(f'{kind} tests: {len(chosen)} ran, none skipped')
