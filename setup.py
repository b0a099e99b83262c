# nbdev-2 style setup: everything is read from settings.ini (pyproject.toml marks these fields dynamic).
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
readme = Path('README.md')
setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    long_description=readme.read_text(encoding='utf-8') if readme.exists() else c['description'],
    long_description_content_type='text/markdown',
    keywords=c['keywords'].split(), author=c['author'], author_email=c['author_email'],
    license=c['license'], url=c['git_url'], project_urls={'Documentation': c['doc_host'] + c['doc_baseurl']},
    classifiers=['Programming Language :: Python :: 3', 'Intended Audience :: Science/Research',
                 'Topic :: Scientific/Engineering :: Artificial Intelligence'],
    python_requires='>=' + c['min_python'],
    packages=setuptools.find_packages(include=[c['lib_name'], c['lib_name'] + '.*']),
    include_package_data=True,
    install_requires=c.get('requirements', '').split(),
    extras_require={'dev': c.get('dev_requirements', '').split()},
    entry_points={'console_scripts': c.get('console_scripts', '').split(),
                  'nbdev': [f"{c['lib_name']}={c['lib_name']}._modidx:d"]},
    zip_safe=False)
