"""Fail when the PostgreSQL tests of a JUnit report skipped or never ran."""
import sys
import xml.etree.ElementTree as ET

cases = [c for c in ET.parse(sys.argv[1]).iter('testcase')
         if 'postgres' in c.get('name', '')]
skipped = [c.get('name') for c in cases if c.find('skipped') is not None]
if not cases or skipped:
    print(f'PostgreSQL tests: {len(cases)} found, skipped: {skipped}')
    sys.exit(1)
print(f'PostgreSQL tests: {len(cases)} ran, none skipped')
