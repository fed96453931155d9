#!/bin/busybox sh
# shellcheck shell=dash
# GET / lands here: busybox httpd falls back to /cgi-bin/index.cgi when
# /www has no index.html.
esc() { printf '%s' "$1" | /bin/busybox sed 's/&/\&amp;/g; s/</\&lt;/g; s/>/\&gt;/g; s/"/\&quot;/g'; }
name=$(esc "${PREVIEW_NAME:-}")
url=$(esc "${PREVIEW_URL:-}")
printf 'Content-Type: text/html; charset=utf-8\r\n\r\n'
printf '<!doctype html>\n<html><head><title>Preview: %s</title></head><body>\n' "$name"
printf '<h1>Preview: %s</h1>\n' "$name"
[ -n "$url" ] && printf '<p>URL: <a href="%s">%s</a></p>\n' "$url" "$url"
printf '<p><a href="/cgi-bin/env">environment</a></p>\n</body></html>\n'
