// Copy the browser builds of the demo page's Markdown libraries (and their licences) from
// node_modules into the Python package, which serves the page with no bundler at /demo/.
// `--check` copies nothing: it fails unless the copies equal the pinned packages' files.
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "..", "node_modules");
const target = join(here, "..", "..", "..", "backstream", "web", "demo", "vendor");

/** Each package's files: its path in the package -> its name in vendor/ (served names end in
 * .js; the .d.ts files type-check the page). */
const FILES = {
  marked: { "lib/marked.esm.js": "marked.esm.js", "lib/marked.d.ts": "marked.esm.d.ts", LICENSE: "marked.LICENSE" },
  dompurify: {
    "dist/purify.es.mjs": "purify.es.js",
    "dist/purify.es.d.mts": "purify.es.d.ts",
    LICENSE: "dompurify.LICENSE",
    "LICENSE-MPL": "dompurify.LICENSE-MPL",
  },
};

/** @returns {string[]} what differs from the pinned packages (empty: nothing) */
function check() {
  const pinned = JSON.parse(readFileSync(join(here, "..", "package.json"), "utf8")).devDependencies;
  const problems = [];
  const expected = new Set();
  for (const [name, files] of Object.entries(FILES)) {
    const manifest = join(modules, name, "package.json");
    if (!existsSync(manifest)) {
      problems.push(`${name} is not installed: run \`npm ci\` in clients/js`);
      continue;
    }
    const { version } = JSON.parse(readFileSync(manifest, "utf8"));
    if (version !== pinned[name]) problems.push(`${name} ${version} is installed but ${pinned[name]} is pinned: run \`npm ci\``);
    for (const [from, to] of Object.entries(files)) {
      expected.add(to);
      const copy = join(target, to);
      if (!existsSync(copy)) problems.push(`vendor/${to} is missing`);
      else if (!readFileSync(copy).equals(readFileSync(join(modules, name, from)))) problems.push(`vendor/${to} differs from ${name}/${from}`);
    }
  }
  for (const name of existsSync(target) ? readdirSync(target) : []) {
    if (!expected.has(name)) problems.push(`vendor/${name} comes from no pinned package`);
  }
  return problems;
}

if (process.argv.includes("--check")) {
  const problems = check();
  for (const problem of problems) console.error(problem);
  if (problems.length > 0) {
    console.error("run `npm run vendor-demo` in clients/js to copy the pinned packages' files");
    process.exit(1);
  }
  console.log(`vendor/ matches ${Object.keys(FILES).join(", ")}`);
} else {
  mkdirSync(target, { recursive: true });
  for (const [name, files] of Object.entries(FILES)) {
    for (const [from, to] of Object.entries(files)) copyFileSync(join(modules, name, from), join(target, to));
  }
  console.log(`copied ${Object.keys(FILES).join(", ")} to ${target}`);
}
