# Minimal nbdev-2 style setup: everything is read from settings.ini.
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    author=c['author'], license=c['license'], python_requires='>=' + c['min_python'],
    packages=setuptools.find_packages(include=[c['lib_name'], c['lib_name'] + '.*']),
    include_package_data=True, package_data={c['lib_name']: ['assets/*']},
    install_requires=c.get('requirements', '').split(),
    extras_require={'dev': c.get('dev_requirements', '').split()},
    entry_points={'console_scripts': c.get('console_scripts', '').split(),
                  'nbdev': [f"{c['lib_name']}={c['lib_name']}._modidx:d"]},
    zip_safe=False)
