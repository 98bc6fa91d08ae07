#!/usr/bin/env bash
# Builds the Debian package out/balloond_<version>_amd64.deb and checks it with lintian.
#   - /usr/sbin/balloond: the release build with the Swift standard library linked in
#     (swift build -c release --static-swift-stdlib, no $ORIGIN runpath, -z now), stripped;
#   - balloond.service (packaging/balloond.service), options from the conffile
#     /etc/default/balloond (packaging/default);
#   - /usr/lib/modules-load.d/balloond.conf: uio_pci_generic at boot;
#   - balloond(8), generated from the commands' help by swift-argument-parser's
#     generate-manual plugin;
#   - copyright, changelog, md5sums, and dh_installsystemd-style maintainer scripts.
# The version is `balloond --version`; packaging/changelog's top entry must match it.
# Depends comes from dpkg-shlibdeps (what the binary links: libc6, libgcc-s1, libpci3,
# libstdc++6, zlib1g).
# lintian must report no errors (it is installed by scripts/setup.sh; installed here too
# when missing and running as root). Environment: BALLOOND_PACKAGE_OUT (default out/),
# BALLOOND_MAINTAINER (default: git's user.name <user.email>).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${BALLOOND_PACKAGE_OUT:-$REPO/out}
WORK=${BALLOOND_CACHE:-$REPO/.cache}/package
PKG=packaging

say() { echo "package: $*" >&2; }
die() { echo "package: $*" >&2; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps strip gzip md5sum; do
  command -v "$tool" >/dev/null || die "$tool is missing (Debian packages dpkg, dpkg-dev, binutils, gzip, coreutils)"
done
if ! command -v lintian >/dev/null; then
  [ "$(id -u)" = 0 ] || die "lintian is missing: run scripts/setup.sh (as root) or apt-get install lintian"
  say "installing lintian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null; } ||
    die "cannot install lintian"
fi

# The release build (only relinks when scripts/test.sh already built it). Without $ORIGIN
# in the runpath (the static standard library needs no library next to the binary), and
# with immediate binding (full RELRO, as Debian's hardening flags ask).
BUILD=(swift build -c release --static-swift-stdlib --disable-local-rpath -Xlinker -z -Xlinker now)
say "${BUILD[*]} --product balloond"
"${BUILD[@]}" --product balloond >&2
BIN=$("${BUILD[@]}" --show-bin-path)/balloond
VERSION=$("$BIN" --version)
[[ $VERSION =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || die "'balloond --version' printed '$VERSION', not a Debian version"
ARCH=amd64
[ "$(dpkg --print-architecture)" = "$ARCH" ] || die "this builds the $ARCH package; dpkg's architecture is $(dpkg --print-architecture)"

top=$(sed -nE '1s/^balloond \(([^)]+)\).*/\1/p' "$PKG/changelog")
[ "$top" = "$VERSION" ] || die "packaging/changelog's top entry is '$top', balloond --version is '$VERSION': add a changelog entry for $VERSION"

MAINTAINER=${BALLOOND_MAINTAINER:-"$(git config user.name 2>/dev/null || echo balloond maintainers) <$(git config user.email 2>/dev/null || echo root@localhost)>"}
# Reproducible timestamps: the last commit's time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
DATE=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)

# The manual page, from the same command definitions as --help (a debug build: the plugin
# must not relink the static release binary).
say "generating balloond(8) (swift package plugin generate-manual)"
swift package plugin generate-manual --section 8 --date "$DATE" --authors "$MAINTAINER" --configuration debug >&2
MAN=$REPO/.build/plugins/GenerateManual/outputs/balloond/balloond.8
[ -s "$MAN" ] || die "generate-manual wrote no $MAN"

ROOT=$WORK/root
rm -rf "$WORK"
mkdir -p "$ROOT/DEBIAN" "$ROOT/usr/sbin" "$ROOT/usr/lib/systemd/system" "$ROOT/usr/lib/modules-load.d" "$ROOT/etc/default" \
  "$ROOT/usr/share/man/man8" "$ROOT/usr/share/doc/balloond"
subst() { sed -e "s|@VERSION@|$VERSION|g" -e "s|@MAINTAINER@|$MAINTAINER|g" "$@"; }

install -m 0755 "$BIN" "$ROOT/usr/sbin/balloond"
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$ROOT/usr/sbin/balloond"
[ "$("$ROOT/usr/sbin/balloond" --version)" = "$VERSION" ] || die "the stripped binary does not run"
install -m 0644 "$PKG/balloond.service" "$ROOT/usr/lib/systemd/system/balloond.service"
install -m 0644 "$PKG/modules-load.conf" "$ROOT/usr/lib/modules-load.d/balloond.conf"
install -m 0644 "$PKG/default" "$ROOT/etc/default/balloond"
# mdoc wants no empty lines (groff warns): paragraph breaks are .Pp.
sed 's/^[[:space:]]*$/.Pp/' "$MAN" | gzip -9n >"$ROOT/usr/share/man/man8/balloond.8.gz"
subst "$PKG/copyright" >"$ROOT/usr/share/doc/balloond/copyright"
subst "$PKG/changelog" | gzip -9n >"$ROOT/usr/share/doc/balloond/changelog.gz"
for script in postinst prerm postrm; do install -m 0755 "$PKG/$script" "$ROOT/DEBIAN/$script"; done
echo /etc/default/balloond >"$ROOT/DEBIAN/conffiles"
chmod 0644 "$ROOT/DEBIAN/conffiles" "$ROOT/usr/share/doc/balloond/"* "$ROOT/usr/share/man/man8/balloond.8.gz"

# Depends: what the binary links, with the versions its symbols need.
mkdir -p "$WORK/shlibs/debian"
printf 'Source: balloond\n\nPackage: balloond\nArchitecture: %s\n' "$ARCH" >"$WORK/shlibs/debian/control"
DEPENDS=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O "$ROOT/usr/sbin/balloond" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$DEPENDS" ] || die "dpkg-shlibdeps found no dependencies for the binary"
for lib in libc6 libpci3 zlib1g; do
  [[ $DEPENDS == *"$lib "* ]] || die "Depends ($DEPENDS) lacks $lib: check the binary with ldd"
done

(cd "$ROOT" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"
SIZE=$(du -sk --apparent-size --exclude=DEBIAN "$ROOT" | cut -f1)
subst "$PKG/control.in" | sed -e "s|@INSTALLED_SIZE@|$SIZE|" -e "s|@DEPENDS@|$DEPENDS|" >"$ROOT/DEBIAN/control"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/md5sums"
find "$ROOT" -type d -exec chmod 0755 {} +
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$OUT"
DEB=$OUT/balloond_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >&2

say "lintian $DEB"
if ! lintian --fail-on error --display-info --suppress-tags-from-file "$PKG/lintian-suppressed" "$DEB" >&2; then
  die "lintian found errors in $DEB"
fi
say "built $DEB"
echo "$DEB"
