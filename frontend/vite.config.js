// The demo's React page (/react/): built into demo_project/static/react/,
// which Django serves as static files; the page itself is the demo's view.
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

export default defineConfig({
  plugins: [react()],
  base: "/static/react/",
  build: {
    outDir: "../demo_project/static/react",
    emptyOutDir: true,
    manifest: true,
  },
});
