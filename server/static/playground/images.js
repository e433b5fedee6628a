// Images for the next message: from the file picker, a paste or a drop; checked against the server's own
// limits (GET /limits) before they are attached, previewed, and sent as data URIs.

const MIME = { JPEG: "image/jpeg", PNG: "image/png", GIF: "image/gif", WEBP: "image/webp", BMP: "image/bmp" };

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function dimensions(file) {
  const url = URL.createObjectURL(file);
  try {
    const img = new Image();
    img.src = url;
    await img.decode();
    return [img.naturalWidth, img.naturalHeight];
  } finally {
    URL.revokeObjectURL(url);
  }
}

function mib(n) {
  return `${(n / 2 ** 20).toFixed(n < 2 ** 20 ? 2 : 0)} MiB`;
}

function mp(n) {
  return n >= 1e5 ? `${(n / 1e6).toFixed(1)} megapixels` : `${n} pixels`;
}

const limited = (v) => typeof v === "number";     // null or absent: the server enforces no such limit

export function describeLimits(L) {
  const each = [limited(L.max_image_bytes) ? mib(L.max_image_bytes) : "",
                limited(L.max_image_pixels) ? mp(L.max_image_pixels) : ""].filter(Boolean);
  const parts = [`images${each.length ? ` up to ${each.join(" and ")} each` : ""}`
                 + (L.image_formats ? ` (${L.image_formats.join(", ")})` : "")];
  if (limited(L.max_images)) parts.push(`${L.max_images} per request`);
  if (limited(L.max_request_pixels)) parts.push(`${mp(L.max_request_pixels)} per request`);
  if (limited(L.max_body_bytes)) parts.push(`request bodies up to ${mib(L.max_body_bytes)}`);
  return `Server limits: ${parts.join("; ")}.`;
}

export class Attachments {
  /** `sent()`: the images already in the conversation (the next request carries them all). */
  constructor(container, limits, notify, sent) {
    this.container = container;
    this.limits = limits;
    this.notify = notify;
    this.sent = sent;
    this.items = [];
    // without a list from the server, any image type goes and the server judges it
    this.types = limits.image_formats ? new Set(limits.image_formats.map((f) => MIME[f]).filter(Boolean)) : null;
  }

  /** Images come from the file picker, a paste into the message box, or a drop on the composer. */
  listen(picker, textbox, dropZone) {
    picker.accept = this.types ? [...this.types].join(",") : "image/*";
    picker.addEventListener("change", async () => {
      await this.add([...picker.files]);
      picker.value = "";
    });
    textbox.addEventListener("paste", (e) => {
      const files = [...e.clipboardData.files];
      if (files.length) {
        e.preventDefault();
        this.add(files);
      }
    });
    dropZone.addEventListener("dragover", (e) => {
      e.preventDefault();
      dropZone.classList.add("dropping");
    });
    dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dropping"));
    dropZone.addEventListener("drop", (e) => {
      e.preventDefault();
      dropZone.classList.remove("dropping");
      this.add([...e.dataTransfer.files]);
    });
  }

  /** Check and attach files; each refusal says why. */
  async add(files) {
    for (const file of files) {
      try {
        this.items.push(await this.check(file));
      } catch (e) {
        this.notify(`${file.name || "image"}: ${e.message}`);
      }
    }
    this.render();
  }

  async check(file) {
    const L = this.limits;
    const others = [...this.sent(), ...this.items];
    if (this.types ? !this.types.has(file.type) : !file.type.startsWith("image/")) {
      throw new Error(`${file.type || "this file type"} is not accepted; the server takes `
                      + `${this.types ? [...this.types].join(", ") : "images"}`);
    }
    if (limited(L.max_image_bytes) && file.size > L.max_image_bytes) {
      throw new Error(`${mib(file.size)} is over the server's limit of ${mib(L.max_image_bytes)} per image`);
    }
    if (limited(L.max_images) && others.length + 1 > L.max_images) {
      throw new Error(`a request carries at most ${L.max_images} images (the conversation's included)`);
    }
    // as base64 in a JSON body, with the conversation's other images
    const body = [...others, { bytes: file.size }].reduce((n, i) => n + Math.ceil(i.bytes / 3) * 4 + 64, 0);
    if (limited(L.max_body_bytes) && body > L.max_body_bytes) {
      throw new Error(`the request would carry ${mib(body)} of images, over the server's body limit of `
                      + `${mib(L.max_body_bytes)}`);
    }
    let w, h;
    try {
      [w, h] = await dimensions(file);
    } catch {
      throw new Error("the browser cannot decode this image");
    }
    if (limited(L.max_image_pixels) && w * h > L.max_image_pixels) {
      throw new Error(`${w}×${h} is ${mp(w * h)}, over the server's limit of ${mp(L.max_image_pixels)} per image`);
    }
    const pixels = others.reduce((n, i) => n + i.width * i.height, w * h);
    if (limited(L.max_request_pixels) && pixels > L.max_request_pixels) {
      throw new Error(`the request's images would have ${mp(pixels)}, over the server's limit of `
                      + `${mp(L.max_request_pixels)} per request`);
    }
    return { name: file.name || "pasted image", url: await readDataURL(file), width: w, height: h, bytes: file.size };
  }

  take() {
    const items = this.items;
    this.items = [];
    this.render();
    return items;
  }

  render() {
    this.container.replaceChildren();
    this.items.forEach((item, i) => {
      const fig = document.createElement("figure");
      fig.className = "attachment";
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      const cap = document.createElement("figcaption");
      cap.textContent = `${item.width}×${item.height}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${item.name}`);
      remove.addEventListener("click", () => {
        this.items.splice(i, 1);
        this.render();
      });
      fig.append(img, cap, remove);
      this.container.append(fig);
    });
    this.container.hidden = this.items.length === 0;
  }
}
